"""Pictures of a searched architecture and of its FLOPs during the search.

Pure functions returning RGB ``uint8`` arrays (H, W, 3), the format of
mmengine's ``Visualizer.add_image``. They draw on a private matplotlib
``Figure`` with the Agg canvas, so they neither need a display nor touch
pyplot's global state or backend.
"""
import io
import logging

import numpy as np
from mmengine.logging import print_log
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .fileio import atomic_write_bytes

# Fixed colours for the supernet's kernel sizes, tab10 for any other.
KERNEL_COLORS = {3: '#4C72B0', 5: '#DD8452', 7: '#55A868'}
_EXTRA_COLORS = ('#C44E52', '#8172B3', '#937860', '#DA8BC3', '#8C8C8C')


def _to_rows(arch):
    """Rows of an arch dict, a zoo name or a list of rows."""
    if isinstance(arch, str):
        from .models.archs import get_arch
        arch = get_arch(arch)
    rows = arch.get('rows') if isinstance(arch, dict) else arch
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f'arch: expected a zoo name, a dict with "rows" or '
                         f'a non-empty list of rows, got {arch!r}')
    return rows


def block_widths(arch):
    """Per-block ``(stride, {kernel_size: hidden width})``, repeats expanded.

    Args:
        arch (str | dict | list): A zoo name, an arch dict with ``rows`` or
            the rows ``[out, repeats, stride, kernels, hidden, has_expand]``.

    Returns:
        list[tuple[int, dict[int, int]]]: One entry per block.
    """
    blocks = []
    for i, row in enumerate(_to_rows(arch)):
        if not isinstance(row, (list, tuple)) or len(row) != 6:
            raise ValueError(f'arch: row {i} must be [out_channels, repeats, '
                             f'stride, kernel_sizes, hidden, has_expand], '
                             f'got {row!r}')
        _, repeats, stride, kernels, hidden, _ = row
        if len(kernels) != len(hidden):
            raise ValueError(f'arch: row {i} has {len(kernels)} kernel sizes '
                             f'but {len(hidden)} hidden widths')
        widths = {int(k): int(h) for k, h in zip(kernels, hidden)}
        for r in range(int(repeats)):
            blocks.append((int(stride) if r == 0 else 1, widths))
    return blocks


def _kernel_color(kernel, extra_index):
    return KERNEL_COLORS.get(kernel,
                             _EXTRA_COLORS[extra_index % len(_EXTRA_COLORS)])


def _new_figure(figsize):
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _render(fig):
    """The figure's pixels as an RGB uint8 array."""
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def draw_arch(arch, flops=None, title=None, figsize=(10, 4)):
    """Hidden width per kernel size of every block, as stacked bars.

    Args:
        arch (str | dict | list): A zoo name, an arch dict with ``rows`` or
            a list of rows.
        flops (float, optional): Multiply-adds, shown (in M) in the title.
        title (str, optional): Title text; the FLOPs are appended.
        figsize (tuple[float, float]): Figure size in inches (100 dpi).

    Returns:
        np.ndarray: RGB image, ``uint8``, shape ``(H, W, 3)``.
    """
    blocks = block_widths(arch)
    kernels = sorted({k for _, widths in blocks for k in widths})
    fig = _new_figure(figsize)
    ax = fig.add_subplot()
    x = np.arange(len(blocks))
    bottom = np.zeros(len(blocks))
    extra = 0
    for k in kernels:
        heights = np.array([w.get(k, 0) for _, w in blocks], dtype=float)
        ax.bar(x, heights, bottom=bottom, width=0.8,
               color=_kernel_color(k, extra), label=f'{k}x{k}')
        extra += k not in KERNEL_COLORS
        bottom += heights
    for i, (stride, _) in enumerate(blocks):
        if stride > 1:  # a new resolution starts here
            ax.axvline(i - 0.5, color='0.6', linestyle='--', linewidth=0.8)
    ax.set_xlim(-0.6, len(blocks) - 0.4)
    ax.set_xticks(x)
    ax.tick_params(axis='x', labelsize=7)
    ax.set_xlabel('block (dashed: stride 2)')
    ax.set_ylabel('hidden channels')
    ax.legend(title='kernel', loc='upper left', fontsize=8)
    parts = [title] if title else []
    if flops is not None:
        parts.append(f'{flops / 1e6:.1f}M FLOPs')
    parts.append(f'{int(bottom.sum())} hidden channels')
    ax.set_title(', '.join(parts))
    return _render(fig)


def draw_flops_curve(history, x='iter', figsize=(6, 4)):
    """FLOPs (M) over training, e.g. ``AtomShrinkHook.history``.

    Args:
        history (list[dict]): Entries with ``'flops'`` and the ``x`` key
            (``'iter'`` or ``'epoch'``); entries whose ``removed_atoms`` is
            not None are marked as shrink steps.
        x (str): The history key for the x axis.
        figsize (tuple[float, float]): Figure size in inches (100 dpi).

    Returns:
        np.ndarray: RGB image, ``uint8``, shape ``(H, W, 3)``.
    """
    if not history:
        raise ValueError('history: expected at least one entry')
    for i, entry in enumerate(history):
        missing = {'flops', x} - set(entry)
        if missing:
            raise ValueError(f'history: entry {i} lacks {sorted(missing)}')
    xs = np.array([entry[x] for entry in history], dtype=float)
    ys = np.array([entry['flops'] for entry in history], dtype=float) / 1e6
    fig = _new_figure(figsize)
    ax = fig.add_subplot()
    # FLOPs only change at shrink steps: hold each value until the next.
    ax.step(xs, ys, where='post', color=KERNEL_COLORS[3])
    shrinks = [i for i, e in enumerate(history)
               if e.get('removed_atoms') is not None]
    if shrinks:
        ax.plot(xs[shrinks], ys[shrinks], 'o', color=KERNEL_COLORS[5],
                markersize=4, label='shrink')
        ax.legend(fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel('FLOPs (M)')
    ax.set_title(f'FLOPs {ys[0]:.1f}M -> {ys[-1]:.1f}M')
    ax.grid(alpha=0.3)
    return _render(fig)


def save_image(img, path):
    """Write an RGB uint8 image as PNG, atomically (parent folders created).

    The PNG is encoded in memory and written with
    :func:`atomnas_mm.fileio.atomic_write_bytes`: a kill or a full disk
    leaves the previous picture at ``path`` (or none), never a partial one.

    Raises:
        ValueError: If ``img`` is not an RGB uint8 array.
        OSError: If the file cannot be written (``path`` is then unchanged).
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'img: expected an RGB uint8 array (H, W, 3), got '
                         f'{img.dtype} {img.shape}')
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format='PNG')
    atomic_write_bytes(path, buffer.getvalue())
    return path


def save_image_or_warn(img, path, logger='current'):
    """:func:`save_image`, logging a warning instead of raising ``OSError``.

    For pictures written while training runs: a full disk or a missing
    permission must not stop the training.

    Args:
        img (np.ndarray): RGB uint8 image.
        path (str): The PNG file.
        logger (str | logging.Logger): Where the warning goes (mmengine's
            :func:`~mmengine.logging.print_log`).

    Returns:
        str | None: ``path``, or None when it could not be written.
    """
    try:
        return save_image(img, path)
    except OSError as e:
        print_log(f'Could not write the picture {path} ({e}); training '
                  'goes on without it.', logger=logger, level=logging.WARNING)
        return None
