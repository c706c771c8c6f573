"""AtomNAS architectures as data (ATOMNAS.md sections 2 and 3).

A row is ``[out_channels, repeats, stride, kernel_sizes, hidden_per_kernel,
has_expand_conv]``. An arch is a dict with ``rows``, ``stem_channels`` and
``last_channels``; the ``_plus`` archs add ``act_cfg`` and ``se_ratio`` defaults.
"""
import copy

# Supernet stages: (expand ratio, out channels, repeats, first stride, kernels).
SUPERNET_STAGES = [
    (1, 16, 1, 1, [3]),
    (6, 24, 4, 2, [3, 5, 7]),
    (6, 40, 4, 2, [3, 5, 7]),
    (6, 80, 4, 2, [3, 5, 7]),
    (6, 96, 4, 1, [3, 5, 7]),
    (6, 192, 4, 2, [3, 5, 7]),
    (6, 320, 1, 1, [3, 5, 7]),
]

ATOMNAS_A_ROWS = [
    [16, 1, 1, [3], [16], False], [24, 1, 2, [3, 5, 7], [16, 12, 9], True], [24, 1, 1, [3, 5, 7], [19, 2, 1], True],
    [24, 1, 1, [3, 5, 7], [9, 7, 1], True], [24, 1, 1, [3, 5], [14, 1], True], [40, 1, 2, [3, 5, 7], [46, 49, 50], True],
    [40, 1, 1, [3, 5, 7], [27, 19, 14], True], [40, 1, 1, [3, 5, 7], [22, 11, 3], True], [40, 1, 1, [3, 5, 7], [30, 14, 3], True],
    [80, 1, 2, [3, 5, 7], [127, 130, 111], True], [80, 1, 1, [3, 5, 7], [33, 25, 45], True], [80, 1, 1, [3, 5, 7], [38, 12, 34], True],
    [80, 1, 1, [3, 5, 7], [53, 23, 19], True], [96, 1, 1, [3, 5, 7], [344, 196, 168], True], [96, 1, 1, [3, 5, 7], [44, 18, 27], True],
    [96, 1, 1, [3, 5, 7], [37, 29, 18], True], [96, 1, 1, [3, 5, 7], [52, 21, 24], True], [192, 1, 2, [3, 5, 7], [381, 364, 342], True],
    [192, 1, 1, [3, 5, 7], [123, 76, 162], True], [192, 1, 1, [3, 5, 7], [179, 107, 212], True], [192, 1, 1, [3, 5, 7], [238, 111, 171], True],
    [320, 1, 1, [3, 5, 7], [654, 495, 546], True],
]

ATOMNAS_B_ROWS = [
    [16, 1, 1, [3], [32], False], [24, 1, 2, [3, 5, 7], [7, 15, 17], True], [24, 1, 1, [3, 5], [16, 4], True],
    [24, 1, 1, [3, 5, 7], [17, 7, 1], True], [24, 1, 1, [3, 5, 7], [22, 4, 1], True], [40, 1, 2, [3, 5, 7], [58, 66, 67], True],
    [40, 1, 1, [3, 5, 7], [39, 24, 17], True], [40, 1, 1, [3, 5, 7], [22, 13, 3], True], [40, 1, 1, [3, 5, 7], [38, 16, 3], True],
    [80, 1, 2, [3, 5, 7], [166, 148, 151], True], [80, 1, 1, [3, 5, 7], [31, 43, 65], True], [80, 1, 1, [3, 5, 7], [41, 15, 28], True],
    [80, 1, 1, [3, 5, 7], [77, 21, 43], True], [96, 1, 1, [3, 5, 7], [378, 256, 204], True], [96, 1, 1, [3, 5, 7], [54, 31, 32], True],
    [96, 1, 1, [3, 5, 7], [54, 26, 26], True], [96, 1, 1, [3, 5, 7], [73, 42, 26], True], [192, 1, 2, [3, 5, 7], [442, 433, 430], True],
    [192, 1, 1, [3, 5, 7], [154, 112, 263], True], [192, 1, 1, [3, 5, 7], [234, 142, 282], True], [192, 1, 1, [3, 5, 7], [295, 190, 202], True],
    [320, 1, 1, [3, 5, 7], [766, 631, 671], True],
]

ATOMNAS_C_ROWS = [
    [16, 1, 1, [3], [32], False], [24, 1, 2, [3, 5, 7], [15, 23, 13], True], [24, 1, 1, [3, 5, 7], [20, 3, 2], True],
    [24, 1, 1, [3, 5, 7], [21, 8, 1], True], [24, 1, 1, [3, 5], [21, 4], True], [40, 1, 2, [3, 5, 7], [64, 65, 70], True],
    [40, 1, 1, [3, 5, 7], [40, 23, 28], True], [40, 1, 1, [3, 5, 7], [36, 21, 9], True], [40, 1, 1, [3, 5, 7], [40, 22, 7], True],
    [80, 1, 2, [3, 5, 7], [169, 170, 157], True], [80, 1, 1, [3, 5, 7], [45, 55, 74], True], [80, 1, 1, [3, 5, 7], [58, 21, 37], True],
    [80, 1, 1, [3, 5, 7], [77, 18, 39], True], [96, 1, 1, [3, 5, 7], [393, 263, 247], True], [96, 1, 1, [3, 5, 7], [57, 40, 36], True],
    [96, 1, 1, [3, 5, 7], [61, 34, 26], True], [96, 1, 1, [3, 5, 7], [87, 38, 33], True], [192, 1, 2, [3, 5, 7], [454, 468, 468], True],
    [192, 1, 1, [3, 5, 7], [188, 137, 306], True], [192, 1, 1, [3, 5, 7], [253, 187, 314], True], [192, 1, 1, [3, 5, 7], [345, 202, 233], True],
    [320, 1, 1, [3, 5, 7], [823, 738, 749], True],
]


def supernet_rows(stem_channels=32, stages=SUPERNET_STAGES):
    """Expand the supernet stage table into one row per block.

    The hidden width of each kernel branch is ``t * C_in``; the first block
    (``t == 1``) is a depthwise conv on the stem output without expand conv.
    """
    rows, in_channels = [], stem_channels
    for t, out, repeats, stride, kernels in stages:
        for i in range(repeats):
            hidden = in_channels * t
            rows.append([out, 1, stride if i == 0 else 1, list(kernels),
                         [hidden] * len(kernels), t != 1])
            in_channels = out
    return rows


_PLUS = dict(act_cfg=dict(type='Swish'), se_ratio=0.5)

ARCHS = {
    'supernet': dict(rows=supernet_rows(32), stem_channels=32),
    'atomnas_a': dict(rows=ATOMNAS_A_ROWS, stem_channels=16),
    'atomnas_b': dict(rows=ATOMNAS_B_ROWS, stem_channels=32),
    'atomnas_c': dict(rows=ATOMNAS_C_ROWS, stem_channels=32),
    'atomnas_a_plus': dict(rows=ATOMNAS_A_ROWS, stem_channels=16, **_PLUS),
    'atomnas_b_plus': dict(rows=ATOMNAS_B_ROWS, stem_channels=32, **_PLUS),
    'atomnas_c_plus': dict(rows=ATOMNAS_C_ROWS, stem_channels=32, **_PLUS),
}

# Published ImageNet numbers (ATOMNAS.md section 3): FLOPs = multiply-adds.
PUBLISHED = {
    'atomnas_a': dict(flops=258e6, params=3.9e6, top1=74.6, top5=92.1),
    'atomnas_b': dict(flops=326e6, params=4.4e6, top1=75.5, top5=92.6),
    'atomnas_c': dict(flops=360e6, params=4.7e6, top1=75.9, top5=92.7),
    'atomnas_a_plus': dict(flops=260e6, params=4.7e6, top1=76.3, top5=93.0),
    'atomnas_b_plus': dict(flops=329e6, params=5.5e6, top1=77.2, top5=93.5),
    'atomnas_c_plus': dict(flops=363e6, params=5.9e6, top1=77.6, top5=93.6),
    'supernet': dict(flops=1.52e9, params=11.1e6),
}


def get_arch(name):
    """Return a deep copy of a zoo arch by name (ValueError if unknown)."""
    if name not in ARCHS:
        raise ValueError(f'arch: unknown arch {name!r}; expected one of '
                         f'{sorted(ARCHS)} or a dict with "rows"')
    return copy.deepcopy(ARCHS[name])
