"""Dynamic network shrinkage as pure functions (ATOMNAS.md section 5).

Atoms are addressed by block name (its path in the model, stable across
shrinks) and position in the block's concatenated hidden channels. A *plan*
``{block_name: LongTensor of kept atoms}`` is decided once and applied to the
live model, the EMA copy and the optimizer state alike.
"""
import torch
import torch.nn as nn

from ..models.backbones.atomnas import AtomNAS
from ..models.blocks import AtomicBlock, dw_key
from ..models.cost import atom_costs


def find_backbones(model):
    """``{path: AtomNAS}`` for every AtomNAS backbone in ``model``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, AtomNAS)}


def searchable_blocks(model):
    """``{path: AtomicBlock}`` of every block that has atoms to search."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, AtomicBlock) and m.has_expand
            and m.project is not None}


def block_gammas(block):
    """Depthwise-BN scales of a block's atoms, concatenated (dw order)."""
    if not len(block.dw):
        return torch.zeros(0)
    return torch.cat([m.norm.weight.detach() for m in block.dw.values()])


def plan_shrink(model, threshold=1e-3, ema_model=None, ema_only=False):
    """Decide which atoms survive.

    An atom is dead when ``|gamma| <= threshold`` in ``model`` and in
    ``ema_model`` (or in ``ema_model`` alone when ``ema_only``). A block
    without residual keeps at least its strongest atom.

    Args:
        model (nn.Module): Live model (unwrapped).
        threshold (float): Dead-atom threshold on ``|gamma|``.
        ema_model (nn.Module, optional): Averaged copy with the same names.
        ema_only (bool): Decide on the EMA weights alone (final shrink).

    Returns:
        dict[str, Tensor]: Kept atom indices, only for blocks that lose atoms.
    """
    if ema_only and ema_model is None:
        raise ValueError('ema_only=True needs ema_model')
    ema_blocks = searchable_blocks(ema_model) if ema_model is not None else {}
    plan = {}
    for name, block in searchable_blocks(model).items():
        live = block_gammas(block).abs()
        if name in ema_blocks:
            ema = block_gammas(ema_blocks[name]).abs().to(live.device)
            dead = ema <= threshold if ema_only else \
                (live <= threshold) & (ema <= threshold)
            strength = ema if ema_only else torch.maximum(live, ema)
        else:
            dead, strength = live <= threshold, live
        if dead.all() and not block.use_res:
            dead[strength.argmax()] = False
        if dead.any():
            plan[name] = torch.nonzero(~dead).flatten().cpu()
    return plan


def removed_flops(model, plan, input_size=224):
    """Multiply-adds (at batch 1, ``input_size`` px) the plan removes."""
    names = _block_names(model)
    total = 0.0
    for backbone in find_backbones(model).values():
        costs = atom_costs(backbone.arch_rows(), backbone.stem_channels,
                           input_size)
        for block, cost in zip(backbone.blocks(), costs):
            keep = plan.get(names[id(block)])
            if keep is None or cost is None:
                continue
            per_atom = torch.cat([torch.full((h, ), c)
                                  for c, h in zip(cost, block.hidden)])
            dead = torch.ones(len(per_atom), dtype=torch.bool)
            dead[keep] = False
            total += per_atom[dead].sum().item()
    return total


def _block_names(model):
    """``{id(module): path}`` of every AtomicBlock in ``model``."""
    return {id(m): name for name, m in model.named_modules()
            if isinstance(m, AtomicBlock)}


def _slice_param(module, name, dim, index, renamed):
    old = module._parameters[name]
    new = nn.Parameter(old.detach().index_select(dim, index).clone(),
                       requires_grad=old.requires_grad)
    module._parameters[name] = new
    renamed[old] = (new, dim, index)


def _slice_norm(norm, index, renamed):
    for pname in ('weight', 'bias'):
        if norm._parameters.get(pname) is not None:
            _slice_param(norm, pname, 0, index, renamed)
    for bname in ('running_mean', 'running_var'):
        if norm._buffers.get(bname) is not None:
            norm._buffers[bname] = norm._buffers[bname].index_select(0, index)
    norm.num_features = len(index)


def _slice_conv_module(cm, index, renamed, dim):
    """Slice a ConvModule on its output (dim 0, with its norm) or input (1)."""
    conv = cm.conv
    _slice_param(conv, 'weight', dim, index, renamed)
    if dim == 0:
        if conv.bias is not None:
            _slice_param(conv, 'bias', 0, index, renamed)
        if conv.groups > 1:  # depthwise
            conv.in_channels = conv.groups = len(index)
            cm.in_channels = len(index)
        conv.out_channels = cm.out_channels = len(index)
        if cm.with_norm:
            _slice_norm(cm.norm, index, renamed)
    else:
        conv.in_channels = cm.in_channels = len(index)


def _removed_constant(block, keep_mask):
    """Eval-mode projection input of the removed atoms, ``W_proj @ act(beta)``.

    A dead atom's depthwise BN outputs its bias (``gamma ~ 0``); what reaches
    the projection BN is that constant times the projection column.
    """
    consts = []
    for m in block.dw.values():
        beta = m.norm.bias.detach().clone() if m.norm.bias is not None else \
            torch.zeros(m.conv.out_channels)
        if m.with_activation:
            beta = m.activate(beta.view(1, -1, 1, 1)).flatten()
        consts.append(beta)
    const = torch.cat(consts) * (~keep_mask).to(consts[0].dtype)
    weight = block.project.conv.weight.detach().flatten(1)
    return weight @ const


def shrink_block(block, keep, fold=True):
    """Remove the atoms of ``block`` not in ``keep``, in place.

    Args:
        block (AtomicBlock): Block to shrink.
        keep (Tensor): Sorted indices of surviving atoms (concatenated order).
        fold (bool): Fold the removed atoms' constant output into the
            projection BN's running mean (or into the identity bias of an
            emptied block), so eval-mode outputs do not change.

    Returns:
        dict: ``{old_param: (new_param or None, dim, index)}`` for the
        optimizer; None marks a removed parameter.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    total = sum(block.hidden)
    keep_mask = torch.zeros(total, dtype=torch.bool)
    keep_mask[keep] = True
    renamed = {}
    shift = _removed_constant(block, keep_mask) if fold else None
    if not len(keep):
        if not block.use_res:
            raise ValueError('a block without residual must keep an atom')
        bias = torch.zeros(block.out_channels)
        if fold:
            norm = block.project.norm
            bias = (shift - norm.running_mean) / torch.sqrt(
                norm.running_var + norm.eps) * norm.weight.detach() + \
                norm.bias.detach()
        for p in block.parameters():
            renamed[p] = (None, None, None)
        block.expand = block.se = block.project = None
        block.dw = nn.ModuleDict()
        block.atom_cost = block.atom_cost[:0]
        block.register_buffer('bias', bias.to(block.atom_cost.device))
        return renamed

    keep = keep.to(block.atom_cost.device)
    if block.expand is not None:
        _slice_conv_module(block.expand, keep, renamed, dim=0)
    offset = 0
    for k, h in zip(block.kernel_sizes, block.hidden):
        local = keep[(keep >= offset) & (keep < offset + h)] - offset
        if len(local):
            _slice_conv_module(block.dw[dw_key(k)], local, renamed, dim=0)
        else:
            for p in block.dw[dw_key(k)].parameters():
                renamed[p] = (None, None, None)
            del block.dw[dw_key(k)]
        offset += h
    if block.se is not None:
        _slice_conv_module(block.se.conv1, keep, renamed, dim=1)
        _slice_conv_module(block.se.conv2, keep, renamed, dim=0)
    _slice_conv_module(block.project, keep, renamed, dim=1)
    if fold:
        block.project.norm.running_mean -= shift.to(
            block.project.norm.running_mean)
    block.atom_cost = block.atom_cost.index_select(0, keep)
    return renamed


def apply_plan(model, plan, fold=True):
    """Shrink every block of ``model`` named in ``plan``, in place.

    Returns:
        dict: ``{old_param: (new_param or None, dim, index)}``.
    """
    blocks = dict(model.named_modules())
    renamed = {}
    for name, keep in plan.items():
        if name not in blocks or not isinstance(blocks[name], AtomicBlock):
            raise KeyError(f'plan: {name!r} is not an AtomicBlock of the model')
        renamed.update(shrink_block(blocks[name], keep, fold=fold))
    return renamed


def shrink_optimizer(optimizer, model, renamed):
    """Carry optimizer state over a shrink; keep the optimizer object.

    Each surviving parameter's state tensors of the parameter's old shape are
    sliced like the parameter; removed parameters lose their state. The single
    param group is rebuilt in ``model.named_parameters()`` order.
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError('shrink_optimizer supports one param group (keep '
                         'weight decay as a loss term, no paramwise_cfg); got '
                         f'{len(optimizer.param_groups)} groups')
    group = optimizer.param_groups[0]
    for old in group['params']:
        if old not in renamed:
            continue
        new, dim, index = renamed[old]
        state = optimizer.state.pop(old, None)
        if new is None or state is None:
            continue
        optimizer.state[new] = {
            key: value.index_select(dim, index.to(value.device))
            if torch.is_tensor(value) and value.shape == old.shape else value
            for key, value in state.items()}
    survivors = set()
    for p in group['params']:
        new = renamed[p][0] if p in renamed else p
        if new is not None:
            survivors.add(id(new))
    params = [p for p in model.parameters() if id(p) in survivors]
    if len(params) != len(survivors):
        raise RuntimeError(
            f'optimizer: {len(survivors) - len(params)} surviving params are '
            'not in the model; the model and the optimizer disagree')
    group['params'] = params


def reshape_to_arch(model, archs):
    """Shrink supernet-shaped backbones to stored architectures (for loading).

    Keeps the first ``h`` atoms of every kernel; weights are loaded afterwards.

    Args:
        model (nn.Module): Model whose backbones are at least as wide.
        archs (dict): ``{backbone_path: arch dict}`` as in checkpoint meta.

    Returns:
        dict: ``{old_param: (new_param or None, dim, index)}``.
    """
    backbones = find_backbones(model)
    plan = {}
    for path, arch in archs.items():
        if path not in backbones:
            raise ValueError(f'atomnas_arch: the model has no AtomNAS at '
                             f'{path!r} (has {sorted(backbones)})')
        plan.update(_plan_to_rows(model, path, backbones[path], arch))
    return apply_plan(model, plan, fold=False)


def _plan_to_rows(model, path, backbone, arch):
    rows = arch['rows']
    for key in ('stem_channels', 'last_channels'):
        if key in arch and arch[key] != getattr(backbone, key):
            raise ValueError(f'atomnas_arch: {path}.{key} is {arch[key]} in '
                             f'the checkpoint, {getattr(backbone, key)} in '
                             'the model')
    blocks = backbone.blocks()
    if len(rows) != len(blocks):
        raise ValueError(f'atomnas_arch: {path} has {len(blocks)} blocks, '
                         f'the checkpoint {len(rows)}')
    names = _block_names(model)
    plan = {}
    for i, (row, block) in enumerate(zip(rows, blocks)):
        where = f'atomnas_arch: {path} block {i}'
        if (row[0], row[2], bool(row[5])) != (
                block.out_channels, block.stride, block.has_expand):
            raise ValueError(f'{where}: row {row} does not match the model '
                             f'block (out {block.out_channels}, stride '
                             f'{block.stride}, expand {block.has_expand})')
        have = dict(zip(block.kernel_sizes, block.hidden))
        want = {k: h for k, h in zip(row[3], row[4]) if h > 0}
        keep, offset = [], 0
        for k, h in have.items():
            keep.extend(range(offset, offset + min(want.get(k, 0), h)))
            offset += h
        for k, h in want.items():
            if have.get(k, 0) < h:
                raise ValueError(f'{where}: kernel {k} needs {h} atoms, the '
                                 f'model has {have.get(k, 0)}')
        if want != have:
            plan[names[id(block)]] = torch.tensor(keep, dtype=torch.long)
    return plan


def shrink_model(model, threshold=1e-3, fold=True):
    """Remove dead atoms from every AtomNAS backbone in ``model``, in place.

    The public entry point without a Runner: atoms with ``|gamma| <=
    threshold`` go (a block without residual keeps its strongest atom).

    Args:
        model (nn.Module): Any model holding AtomNAS backbones.
        threshold (float): Dead-atom threshold on ``|gamma|``.
        fold (bool): Fold removed constants so eval outputs do not change.

    Returns:
        dict: Report with ``removed`` (atoms per block name),
        ``removed_atoms`` (total) and ``archs`` (``{path: arch dict}``).
    """
    plan = plan_shrink(model, threshold)
    blocks = dict(model.named_modules())
    removed = {name: int(blocks[name].atom_cost.numel() - len(keep))
               for name, keep in plan.items()}
    apply_plan(model, plan, fold=fold)
    return dict(removed=removed, removed_atoms=sum(removed.values()),
                archs={path: m.arch_dict()
                       for path, m in find_backbones(model).items()})
