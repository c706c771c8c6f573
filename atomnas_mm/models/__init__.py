from .archs import ARCHS, PUBLISHED, get_arch, supernet_rows
from .backbones import AtomNAS
from .blocks import AtomicBlock
from .heads import DropoutLinearClsHead
from .flops_count import count_flops_params
from .narrowed import build_narrowed

__all__ = ['ARCHS', 'PUBLISHED', 'get_arch', 'supernet_rows', 'AtomNAS',
           'AtomicBlock', 'DropoutLinearClsHead', 'build_narrowed',
           'count_flops_params']
