"""AtomNAS architectures as data (docs/method.md, "Search space" and "Zoo").

A *row* describes a group of blocks in the published format
``[out_channels, repeats, stride, kernel_sizes, hidden_per_kernel,
has_expand]`` (:class:`Row`); an *arch* is a dict with ``rows`` and the
optional keys of :data:`ARCH_DEFAULTS`. :func:`parse_arch` is the one place
that validates an arch and expands repeats; the backbone, the pictures, the
export and the converters all use it.
"""
import copy
import math
from typing import NamedTuple


class Row(NamedTuple):
    """One row of an architecture: ``repeats`` blocks of the same shape."""

    out_channels: int
    repeats: int
    stride: int
    kernel_sizes: tuple
    hidden: tuple
    has_expand: bool

    @classmethod
    def parse(cls, value, index=0):
        """A validated Row from a list/tuple; ValueError naming the field."""
        where = f'arch: row {index}'
        if not isinstance(value, (list, tuple)) or len(value) != 6:
            raise ValueError(
                f'{where} must be [out_channels, repeats, stride, '
                f'kernel_sizes, hidden_per_kernel, has_expand], got {value!r}')
        out, repeats, stride, kernels, hidden, has_expand = value
        for name, v in (('out_channels', out), ('repeats', repeats)):
            if not _is_int(v) or v <= 0:
                raise ValueError(f'{where} {name} must be a positive int, '
                                 f'got {v!r}')
        if not _is_int(stride) or stride not in (1, 2):
            raise ValueError(f'{where} stride must be 1 or 2, got '
                             f'{stride!r}')
        if not isinstance(has_expand, bool):
            raise ValueError(f'{where} has_expand must be a bool, got '
                             f'{has_expand!r}')
        for name, v in (('kernel_sizes', kernels),
                        ('hidden_per_kernel', hidden)):
            if not isinstance(v, (list, tuple)):
                raise ValueError(f'{where} {name} must be a list, got {v!r}')
        if len(kernels) != len(hidden):
            raise ValueError(
                f'{where} kernel_sizes {list(kernels)} and hidden_per_kernel '
                f'{list(hidden)} differ in length')
        for k in kernels:
            if not _is_int(k) or k <= 0 or k % 2 == 0:
                raise ValueError(f'{where} kernel size {k!r} must be a '
                                 'positive odd int')
        if len(set(kernels)) != len(kernels):
            raise ValueError(f'{where} kernel_sizes {list(kernels)} repeat a '
                             'kernel size')
        for h in hidden:
            if not _is_int(h) or h < 0:
                raise ValueError(f'{where} hidden width {h!r} must be a '
                                 'non-negative int')
        return cls(out, repeats, stride, tuple(kernels), tuple(hidden),
                   has_expand)

    def to_list(self):
        """The published list format (JSON and checkpoint meta)."""
        return [self.out_channels, self.repeats, self.stride,
                list(self.kernel_sizes), list(self.hidden), self.has_expand]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


class Stage(NamedTuple):
    """A supernet stage: ``depth`` blocks of hidden width ``expand_ratio *
    C_in`` per kernel; the first block has stride ``stride``."""

    expand_ratio: int
    out_channels: int
    depth: int
    stride: int
    kernel_sizes: tuple


# The search space of the paper: MobileNetV2's macro structure, every block
# with kernels 3/5/7 of width 6 * C_in each (the first block: depthwise only).
SUPERNET_STAGES = (
    Stage(1, 16, 1, 1, (3, )),
    Stage(6, 24, 4, 2, (3, 5, 7)),
    Stage(6, 40, 4, 2, (3, 5, 7)),
    Stage(6, 80, 4, 2, (3, 5, 7)),
    Stage(6, 96, 4, 1, (3, 5, 7)),
    Stage(6, 192, 4, 2, (3, 5, 7)),
    Stage(6, 320, 1, 1, (3, 5, 7)),
)

# Defaults of the optional arch keys (documented behaviour): the zoo's ReLU
# nets without SE, one stage per run of equal out_channels, RGB input.
ARCH_DEFAULTS = dict(stem_channels=32, last_channels=1280, in_channels=3,
                     act_cfg=dict(type='ReLU'), se_ratio=None,
                     stage_depths=None)
ARCH_KEYS = ('rows', 'stages') + tuple(ARCH_DEFAULTS)
PLUS_DEFAULTS = dict(act_cfg=dict(type='Swish'), se_ratio=0.5)


def supernet_rows(stem_channels=32, stages=SUPERNET_STAGES):
    """One row per block of a supernet stage table (hidden = ratio * C_in)."""
    rows, in_channels = [], stem_channels
    for stage in stages:
        for i in range(stage.depth):
            hidden = in_channels * stage.expand_ratio
            rows.append(Row(stage.out_channels, 1,
                            stage.stride if i == 0 else 1, stage.kernel_sizes,
                            (hidden, ) * len(stage.kernel_sizes),
                            stage.expand_ratio != 1).to_list())
            in_channels = stage.out_channels
    return rows


def supernet_stage_depths(stages=SUPERNET_STAGES):
    """Blocks per stage of a supernet stage table."""
    return [stage.depth for stage in stages]


def expand_rows(rows):
    """Validated one-block rows (``repeats`` expanded, later strides 1)."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f'arch: rows must be a non-empty list, got {rows!r}')
    blocks = []
    for i, value in enumerate(rows):
        row = Row.parse(value, i)
        for r in range(row.repeats):
            blocks.append(row._replace(repeats=1,
                                       stride=row.stride if r == 0 else 1))
    return blocks


def default_stage_depths(rows):
    """One stage per run of blocks with equal out_channels (the default)."""
    depths = []
    for i, row in enumerate(rows):
        if i == 0 or row.out_channels != rows[i - 1].out_channels:
            depths.append(0)
        depths[-1] += 1
    return depths


def parse_arch(arch):
    """Validate an arch (zoo name or dict) and fill the documented defaults.

    Args:
        arch (str | dict): A zoo name or a dict with ``rows`` (one per
            block group) or ``stages`` (a supernet stage table: rows
            ``[expand_ratio, out_channels, depth, stride, kernel_sizes]``,
            see :class:`Stage`), and any of :data:`ARCH_KEYS`; missing keys
            take :data:`ARCH_DEFAULTS`.

    Returns:
        dict: ``rows`` as one-block :class:`Row` s and every key of
        :data:`ARCH_DEFAULTS` (``stage_depths`` resolved).
    """
    if isinstance(arch, str):
        arch = get_arch(arch)
    if not isinstance(arch, dict) or ('rows' in arch) == ('stages' in arch):
        raise ValueError(f'arch: expected a zoo name or a dict with "rows" '
                         f'or "stages" (one of them), got {arch!r}')
    if 'stages' in arch:
        stages = _parse_stages(arch['stages'])
        arch = dict({k: v for k, v in arch.items() if k != 'stages'},
                    stage_depths=[s.depth for s in stages],
                    rows=supernet_rows(arch.get(
                        'stem_channels', ARCH_DEFAULTS['stem_channels']),
                        stages))
    unknown = set(arch) - set(ARCH_KEYS)
    if unknown:
        raise ValueError(f'arch: unknown keys {sorted(unknown)}; allowed '
                         f'{list(ARCH_KEYS)}')
    spec = copy.deepcopy(ARCH_DEFAULTS)
    spec.update({k: copy.deepcopy(v) for k, v in arch.items()
                 if v is not None or k == 'se_ratio'})
    spec['rows'] = expand_rows(arch['rows'])
    for key in ('stem_channels', 'last_channels', 'in_channels'):
        if not _is_int(spec[key]) or spec[key] <= 0:
            raise ValueError(f'arch: {key} must be a positive int, got '
                             f'{spec[key]!r}')
    if not isinstance(spec['act_cfg'], dict) or 'type' not in spec['act_cfg']:
        raise ValueError(f'arch: act_cfg must be a dict with "type", got '
                         f'{spec["act_cfg"]!r}')
    ratio = spec['se_ratio']
    if ratio is not None and not (isinstance(ratio, (int, float))
                                  and not isinstance(ratio, bool)
                                  and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f'arch: se_ratio must be None or a positive number, '
                         f'got {ratio!r}')
    depths = spec['stage_depths']
    if depths is None:
        depths = default_stage_depths(spec['rows'])
    elif (not isinstance(depths, (list, tuple))
          or not all(_is_int(d) and d > 0 for d in depths)
          or sum(depths) != len(spec['rows'])):
        raise ValueError(f'arch: stage_depths must be positive ints summing '
                         f'to the {len(spec["rows"])} blocks, got {depths!r}')
    spec['stage_depths'] = list(depths)
    first = spec['rows'][0]
    if not first.has_expand and sum(first.hidden) != spec['stem_channels']:
        raise ValueError(
            f'stem_channels: {spec["stem_channels"]} does not match the first '
            f'block, which has no expand conv and hidden {list(first.hidden)}')
    return spec


def _parse_stages(stages):
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f'arch: stages must be a non-empty list, got '
                         f'{stages!r}')
    out = []
    for i, value in enumerate(stages):
        if (not isinstance(value, (list, tuple)) or len(value) != 5
                or not all(_is_int(v) and v > 0 for v in value[:4])
                or not isinstance(value[4], (list, tuple))):
            raise ValueError(
                f'arch: stage {i} must be [expand_ratio, out_channels, depth, '
                f'stride, kernel_sizes] with positive ints, got {value!r}')
        out.append(Stage(*value[:4], tuple(value[4])))
    return out


def _rows(*flat):
    """Rows from ``(out, stride, kernels, hidden, has_expand)`` tuples."""
    return [Row(out, 1, s, tuple(k), tuple(h), e).to_list()
            for out, s, k, h, e in flat]


_K = (3, 5, 7)
ATOMNAS_A_ROWS = _rows(
    (16, 1, [3], [16], False), (24, 2, _K, [16, 12, 9], True),
    (24, 1, _K, [19, 2, 1], True), (24, 1, _K, [9, 7, 1], True),
    (24, 1, [3, 5], [14, 1], True), (40, 2, _K, [46, 49, 50], True),
    (40, 1, _K, [27, 19, 14], True), (40, 1, _K, [22, 11, 3], True),
    (40, 1, _K, [30, 14, 3], True), (80, 2, _K, [127, 130, 111], True),
    (80, 1, _K, [33, 25, 45], True), (80, 1, _K, [38, 12, 34], True),
    (80, 1, _K, [53, 23, 19], True), (96, 1, _K, [344, 196, 168], True),
    (96, 1, _K, [44, 18, 27], True), (96, 1, _K, [37, 29, 18], True),
    (96, 1, _K, [52, 21, 24], True), (192, 2, _K, [381, 364, 342], True),
    (192, 1, _K, [123, 76, 162], True), (192, 1, _K, [179, 107, 212], True),
    (192, 1, _K, [238, 111, 171], True), (320, 1, _K, [654, 495, 546], True))

ATOMNAS_B_ROWS = _rows(
    (16, 1, [3], [32], False), (24, 2, _K, [7, 15, 17], True),
    (24, 1, [3, 5], [16, 4], True), (24, 1, _K, [17, 7, 1], True),
    (24, 1, _K, [22, 4, 1], True), (40, 2, _K, [58, 66, 67], True),
    (40, 1, _K, [39, 24, 17], True), (40, 1, _K, [22, 13, 3], True),
    (40, 1, _K, [38, 16, 3], True), (80, 2, _K, [166, 148, 151], True),
    (80, 1, _K, [31, 43, 65], True), (80, 1, _K, [41, 15, 28], True),
    (80, 1, _K, [77, 21, 43], True), (96, 1, _K, [378, 256, 204], True),
    (96, 1, _K, [54, 31, 32], True), (96, 1, _K, [54, 26, 26], True),
    (96, 1, _K, [73, 42, 26], True), (192, 2, _K, [442, 433, 430], True),
    (192, 1, _K, [154, 112, 263], True), (192, 1, _K, [234, 142, 282], True),
    (192, 1, _K, [295, 190, 202], True), (320, 1, _K, [766, 631, 671], True))

ATOMNAS_C_ROWS = _rows(
    (16, 1, [3], [32], False), (24, 2, _K, [15, 23, 13], True),
    (24, 1, _K, [20, 3, 2], True), (24, 1, _K, [21, 8, 1], True),
    (24, 1, [3, 5], [21, 4], True), (40, 2, _K, [64, 65, 70], True),
    (40, 1, _K, [40, 23, 28], True), (40, 1, _K, [36, 21, 9], True),
    (40, 1, _K, [40, 22, 7], True), (80, 2, _K, [169, 170, 157], True),
    (80, 1, _K, [45, 55, 74], True), (80, 1, _K, [58, 21, 37], True),
    (80, 1, _K, [77, 18, 39], True), (96, 1, _K, [393, 263, 247], True),
    (96, 1, _K, [57, 40, 36], True), (96, 1, _K, [61, 34, 26], True),
    (96, 1, _K, [87, 38, 33], True), (192, 2, _K, [454, 468, 468], True),
    (192, 1, _K, [188, 137, 306], True), (192, 1, _K, [253, 187, 314], True),
    (192, 1, _K, [345, 202, 233], True), (320, 1, _K, [823, 738, 749], True))

_STAGES = dict(stage_depths=supernet_stage_depths())

ARCHS = {
    'supernet': dict(rows=supernet_rows(32), stem_channels=32, **_STAGES),
    'atomnas_a': dict(rows=ATOMNAS_A_ROWS, stem_channels=16, **_STAGES),
    'atomnas_b': dict(rows=ATOMNAS_B_ROWS, stem_channels=32, **_STAGES),
    'atomnas_c': dict(rows=ATOMNAS_C_ROWS, stem_channels=32, **_STAGES),
    'atomnas_a_plus': dict(rows=ATOMNAS_A_ROWS, stem_channels=16, **_STAGES,
                           **PLUS_DEFAULTS),
    'atomnas_b_plus': dict(rows=ATOMNAS_B_ROWS, stem_channels=32, **_STAGES,
                           **PLUS_DEFAULTS),
    'atomnas_c_plus': dict(rows=ATOMNAS_C_ROWS, stem_channels=32, **_STAGES,
                           **PLUS_DEFAULTS),
}

# Published ImageNet numbers (docs/method.md, "Zoo"): FLOPs = multiply-adds.
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
