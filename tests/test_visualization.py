"""atomnas_mm.visualization: architecture and FLOPs pictures."""
import copy

import numpy as np
import pytest
from PIL import Image

from atomnas_mm.models.archs import get_arch
from atomnas_mm.visualization import (KERNEL_COLORS, block_widths, draw_arch,
                                      draw_flops_curve, save_image)


def has_color(img, hex_color):
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(img.astype(int) - rgb).sum(-1) == 0).any())


def assert_picture(img, shape):
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8 and img.shape == shape
    # Not blank: many colours and a fair share of non-white pixels.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    assert (img < 250).any(-1).mean() > 0.05


def test_block_widths_expands_repeats(tiny_arch):
    arch = copy.deepcopy(tiny_arch)
    arch['rows'][1][1] = 2  # the stride-2 row twice
    blocks = block_widths(arch)
    assert len(blocks) == 5
    assert [s for s, _ in blocks] == [1, 2, 1, 1, 2]
    assert blocks[2] == (1, {3: 8, 5: 4})
    assert len(block_widths('atomnas_a')) == 22
    with pytest.raises(ValueError, match='row 0'):
        block_widths([[16, 1, 1, [3, 5], [8], False]])
    with pytest.raises(ValueError, match='arch'):
        block_widths({'rows': []})


def test_draw_arch_shape_colours_and_changes(tiny_arch):
    img_a = draw_arch('atomnas_a', flops=258e6, title='AtomNAS-A')
    assert_picture(img_a, (400, 1000, 3))
    for k in (3, 5, 7):
        assert has_color(img_a, KERNEL_COLORS[k]), k
    # Another arch, other FLOPs, or other widths give another picture.
    img_b = draw_arch(get_arch('atomnas_b'), flops=326e6, title='AtomNAS-B')
    assert img_b.shape == img_a.shape and (img_b != img_a).any()
    assert (draw_arch('atomnas_a', flops=250e6, title='AtomNAS-A')
            != img_a).any()
    arch = copy.deepcopy(tiny_arch)
    base = draw_arch(arch, figsize=(4, 3))
    assert_picture(base, (300, 400, 3))
    arch['rows'][2][4] = [6, 4, 0]  # the 7x7 branch of block 2 removed
    shrunk = draw_arch(arch, figsize=(4, 3))
    assert (shrunk != base).any()
    # Only kernel 3 left: no 5x5 / 7x7 colour anywhere (bars nor legend).
    only3 = draw_arch({'rows': [[16, 1, 1, [3], [8], False],
                                [24, 1, 2, [3], [20], True]]})
    assert has_color(only3, KERNEL_COLORS[3])
    assert not has_color(only3, KERNEL_COLORS[5])
    assert not has_color(only3, KERNEL_COLORS[7])


def history(flops):
    return [dict(epoch=e, iter=10 * e, flops=f, params=1e6,
                 removed_atoms=None if e == 0 else {'backbone.layer1': 3},
                 removed_flops=0.0)
            for e, f in enumerate(flops)]


def test_draw_flops_curve():
    hist = history([1.5e9, 1.2e9, 0.9e9, 0.8e9])
    img = draw_flops_curve(hist)
    assert_picture(img, (400, 600, 3))
    assert has_color(img, KERNEL_COLORS[5])  # the shrink markers
    assert (draw_flops_curve(history([1.5e9, 1.4e9, 0.5e9, 0.4e9]))
            != img).any()
    by_epoch = draw_flops_curve(hist, x='epoch')
    assert by_epoch.shape == img.shape and (by_epoch != img).any()
    single = draw_flops_curve(history([1.5e9]))  # before_train only
    assert single.shape == img.shape
    with pytest.raises(ValueError, match='history'):
        draw_flops_curve([])
    with pytest.raises(ValueError, match=r"entry 1 lacks \['iter'\]"):
        draw_flops_curve([dict(iter=0, flops=1.0), dict(flops=2.0)])


def test_save_image(tmp_path):
    img = draw_arch('atomnas_c', figsize=(3, 2))
    path = tmp_path / 'vis' / 'arch.png'
    assert save_image(img, str(path)) == str(path)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(path) as png:
        assert png.format == 'PNG' and png.mode == 'RGB'
        np.testing.assert_array_equal(np.asarray(png), img)
    with pytest.raises(ValueError, match='img'):
        save_image(img.astype(np.float32), str(tmp_path / 'x.png'))
    with pytest.raises(ValueError, match='img'):
        save_image(img[..., 0], str(tmp_path / 'x.png'))
