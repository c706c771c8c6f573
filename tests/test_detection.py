"""configs/mmdet: AtomNAS backbones in mmdet, pretrained by atomnas_mm, and
the search inside RetinaNet and Faster R-CNN through mmdet's own tools."""
import copy
import importlib.util
import json
import os
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import atomnas_mm  # noqa: F401
from atomnas_mm.models.archs import get_arch
from detection_harness import SMALL_HEADS, child_config, mmdet_tool, \
    write_coco
from harness import clear_global_instances

pytest.importorskip('mmdet', reason='needs mmdet (requirements/mminstall.txt)')
pytest.importorskip('cv2', reason='needs opencv')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    'retinanet': osp.join(REPO, 'configs', 'mmdet',
                          'retinanet_atomnas-a_fpn_1x_coco.py'),
    'faster-rcnn': osp.join(REPO, 'configs', 'mmdet',
                            'faster-rcnn_atomnas-a_fpn_1x_coco.py'),
}
SEARCH_CONFIGS = {
    'retinanet': osp.join(REPO, 'configs', 'mmdet',
                          'retinanet_atomnas-supernet_fpn_search_1x_coco.py'),
    'faster-rcnn': osp.join(
        REPO, 'configs', 'mmdet',
        'faster-rcnn_atomnas-supernet_fpn_search_1x_coco.py'),
}
HEADS = {  # child-config text: 2 classes, detections even when untrained
    'retinanet': 'dict(bbox_head=dict(num_classes=2), '
                 'test_cfg=dict(score_thr=0.0))',
    'faster-rcnn': 'dict(roi_head=dict(bbox_head=dict(num_classes=2)), '
                   'test_cfg=dict(rcnn=dict(score_thr=0.0)))',
}


def load_tool(name):
    path = osp.join(REPO, 'tools', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_classifier(path, arch, seed=0, gammas=None, shrink=None,
                     **backbone):
    """An atomnas_mm ImageClassifier checkpoint (random, non-trivial BN;
    depthwise-BN scales uniform in ``gammas=(low, high)`` if given; atoms
    with ``|gamma| <= shrink`` removed if given, as a search does)."""
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    torch.manual_seed(seed)
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='atomnas_mm.AtomNAS', arch=arch, **backbone),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=1280)))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('running_mean'):
                t.normal_(0, 0.1)
            elif name.endswith('running_var'):
                t.uniform_(0.5, 1.5)
        if gammas is not None:
            for block in model.backbone.blocks():
                for dw in block.dw.values():
                    dw.norm.weight.uniform_(*gammas)
    if shrink is not None:
        from atomnas_mm.search import shrink_model
        assert shrink_model(model, threshold=shrink)['removed_atoms']
    state = model.state_dict()
    arch_dict = model.backbone.arch_dict()
    torch.save(dict(state_dict=state,
                    meta=dict(atomnas_arch=dict(backbone=arch_dict))), path)
    return {k[len('backbone.'):]: v for k, v in state.items()
            if k.startswith('backbone.')}


def built_backbone(cfg_path):
    """The detector of ``cfg_path`` after ``init_weights`` (as the Runner)."""
    from mmdet.registry import MODELS
    cfg = Config.fromfile(cfg_path)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def assert_loss_reaches_backbone(model):
    """One loss and backward of the detector on a 64 px image with a box."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    sample = DetDataSample(metainfo=dict(img_shape=(64, 64),
                                         ori_shape=(64, 64),
                                         scale_factor=(1.0, 1.0)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[10., 12., 40., 50.]]), labels=torch.tensor([1]))
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    model.train()
    data = model.data_preprocessor(dict(inputs=[image],
                                        data_samples=[sample]), True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = model.backbone.layer2[0].expand.conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def assert_same(backbone, expected):
    state = backbone.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def train(cfg, work_dir):
    """2 iterations with tools/train.py; return the checkpoint.

    The tool runs in this process: its global instances are cleared after
    it, as when its own process ends (mmdet's configs name the visualizer
    'visualizer', so tools/test.py would get this one).
    """
    load_tool('train').main([cfg, '--work-dir', work_dir, '--no-validate'])
    clear_global_instances()
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    return ckpt


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('coco'))
    write_coco(root)
    return root


@pytest.mark.slow  # a whole mmdet train + test run: 6-7 s each
@pytest.mark.parametrize('detector', ['retinanet', 'faster-rcnn'])
def test_zoo_backbone(detector, coco, tmp_path):
    pretrained = str(tmp_path / 'atomnas-a_cls.pth')
    expected = write_classifier(pretrained, 'atomnas_a')
    cfg = child_config(str(tmp_path / 'det.py'), CONFIGS[detector], coco,
                       pretrained, HEADS[detector])
    model = built_backbone(cfg)
    assert_same(model.backbone, expected)
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [24, 40, 96, 320]
    assert_loss_reaches_backbone(model)

    work_dir = str(tmp_path / 'work')
    ckpt = train(cfg, work_dir)
    if detector == 'retinanet':   # the test loop, once
        metrics = load_tool('test').main([cfg, ckpt, '--work-dir', work_dir])
        assert 'coco/bbox_mAP' in metrics


@pytest.mark.slow
def test_exported_searched_backbone(coco, tmp_path):
    # What tools/export_searched.py writes for a search of the supernet:
    # arch.json and an ImageClassifier checkpoint of the shrunk net.
    arch = get_arch('atomnas_a')
    arch['rows'] = copy.deepcopy(arch['rows'])
    arch['rows'][2] = [24, 1, 1, [3], [7], True]
    arch['rows'][3] = [24, 1, 1, [], [], True]      # emptied residual block
    arch['rows'][9] = [80, 1, 2, [5, 7], [60, 11], True]
    export = tmp_path / 'export'
    export.mkdir()
    pretrained = str(export / 'searched.pth')
    expected = write_classifier(pretrained, arch, seed=1)
    saved = torch.load(pretrained, weights_only=True)
    with open(export / 'arch.json', 'w') as f:
        json.dump(saved['meta']['atomnas_arch']['backbone'], f)

    cfg = child_config(str(tmp_path / 'det.py'), CONFIGS['retinanet'], coco,
                       pretrained, HEADS['retinanet'],
                       extra_base=str(export / 'arch.json'))
    model = built_backbone(cfg)
    assert model.backbone.arch_rows()[3] == [24, 1, 1, [], [], True]
    assert_same(model.backbone, expected)
    ckpt = torch.load(train(cfg, str(tmp_path / 'work')), weights_only=True)
    assert ckpt['state_dict']['backbone.layer2.2.bias'].shape == (24, )


# -- the search inside detectors, through mmdet's own tools ------------------
# The shipped hooks with test settings: the pretrained scales are uniform in
# (0, 2), so |gamma| <= 0.5 kills about a quarter of the atoms at once.
SEARCH_HOOKS = '''
train_cfg = dict(max_epochs=2, val_interval=10)
custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-3, warmup_epochs=0),
    dict(type='atomnas_mm.AtomShrinkHook', threshold=0.5, min_removed_flops=0,
         interval=1, by_epoch=False, input_size=64)]
log_level = 'INFO'
'''
def last_scalars(work_dir):
    """The last training entry of each run's ``vis_data/scalars.json``."""
    entries = []
    for run in sorted(os.listdir(work_dir)):
        path = osp.join(work_dir, run, 'vis_data', 'scalars.json')
        if osp.isfile(path):
            with open(path) as f:
                entries.append([json.loads(line) for line in f
                                if 'loss_total' in line][-1])
    return entries


@pytest.mark.slow
@pytest.mark.parametrize('detector', ['retinanet', 'faster-rcnn'])
def test_search_in_detector_with_mmdet_tools(detector, coco, tmp_path):
    from atomnas_mm.models import AtomNAS
    from atomnas_mm.models.flops_count import count_flops_params
    pretrained = str(tmp_path / 'supernet_cls.pth')
    write_classifier(pretrained, 'supernet', gammas=(0., 2.),
                     stem_channels=16)
    cfg = child_config(str(tmp_path / 'search.py'), SEARCH_CONFIGS[detector],
                       coco, pretrained, SMALL_HEADS[detector])
    with open(cfg, 'a') as f:
        f.write(SEARCH_HOOKS)
    work_dir = str(tmp_path / 'work')

    # 1 of 2 epochs, then --resume (auto: the work_dir's last checkpoint).
    log = mmdet_tool('train', [cfg, '--work-dir', work_dir, '--cfg-options',
                               'train_cfg.max_epochs=1'], tmp_path)
    assert re.search(r'AtomShrinkHook: removed \d+ atoms', log)
    # The training length is a search setting (it sets the deadline):
    # resuming with another one needs the switch, and says so.
    log = mmdet_tool('train', [cfg, '--work-dir', work_dir, '--resume',
                               '--cfg-options',
                               'resume_with_changed_search=True'], tmp_path)
    assert 'with changed search settings' in log
    assert 'train_cfg.max_epochs: 1 in the checkpoint, 2 now' in log
    assert 'resumed epoch: 1' in log
    assert 'Epoch(train) [2][2/2]' in log and 'Epoch(train) [1]' not in log
    ckpt = torch.load(osp.join(work_dir, 'epoch_2.pth'), weights_only=True)

    # The logged costs are the backbone's alone, before and after shrinking.
    def backbone_costs(arch):
        return count_flops_params(AtomNAS(arch=arch, out_indices=(1, 2, 4, 6)),
                                  (1, 3, 64, 64))

    supernet = AtomNAS('supernet', stem_channels=16).arch_dict()
    first = ckpt['meta']['atomnas_history'][0]
    assert (first['flops'], first['params']) == backbone_costs(supernet)
    searched = backbone_costs(ckpt['meta']['atomnas_arch']['backbone'])
    assert searched[0] < 0.9 * first['flops']
    for run in last_scalars(work_dir):
        assert (run['backbone_flops'], run['backbone_params']) == searched
    laterals = [v.shape[1] for k, v in ckpt['state_dict'].items()
                if re.fullmatch(r'neck\.lateral_convs\.\d\.conv\.weight', k)]
    assert laterals == [24, 40, 96, 320][-len(laterals):]  # FPN inputs kept

    # mmdet's test tool, the unedited config, the shrunk checkpoint.
    log = mmdet_tool('test', [cfg, osp.join(work_dir, 'epoch_2.pth'),
                              '--work-dir', str(tmp_path / 'test')], tmp_path)
    assert 'AtomShrinkHook: model reshaped' in log
    mAP = re.findall(r'coco/bbox_mAP: (-?[0-9.]+)', log)
    assert mAP, log[-3000:]
    print(f'\n{detector}: backbone FLOPs {first["flops"] / 1e6:.3f}M -> '
          f'{searched[0] / 1e6:.3f}M, params {first["params"] / 1e6:.3f}M -> '
          f'{searched[1] / 1e6:.3f}M at 64 px; bbox_mAP {mAP[-1]}')


@pytest.mark.slow
def test_pretrained_init_from_a_shrunk_checkpoint(coco, tmp_path):
    """init_cfg=Pretrained of a mid-search classifier checkpoint narrows the
    supernet of the unedited search config, alone and in a Runner."""
    pretrained = str(tmp_path / 'shrunk_cls.pth')
    expected = write_classifier(pretrained, 'supernet', gammas=(0., 2.),
                                shrink=0.5, stem_channels=16)
    cfg = child_config(str(tmp_path / 'det.py'),
                       SEARCH_CONFIGS['faster-rcnn'], coco, pretrained,
                       SMALL_HEADS['faster-rcnn'])
    assert_same(built_backbone(cfg).backbone, expected)

    with open(cfg, 'a') as f:  # 2 iterations, search hooks and an EMA copy
        f.write(SEARCH_HOOKS + 'train_cfg = dict(max_epochs=1)\n'
                "custom_hooks = [dict(type='EMAHook')] + custom_hooks\n")
    ckpt = torch.load(train(cfg, str(tmp_path / 'work')), weights_only=True)
    state = ckpt['state_dict']
    assert not torch.equal(state['backbone.conv1.conv.weight'],
                           expected['conv1.conv.weight'])  # it trained
    rows = ckpt['meta']['atomnas_arch']['backbone']['rows']
    shrunk = torch.load(pretrained, weights_only=True)['meta'][
        'atomnas_arch']['backbone']['rows']
    for row, start in zip(rows, shrunk):  # as narrow or narrower
        assert all(h <= dict(zip(start[3], start[4]))[k]
                   for k, h in zip(row[3], row[4]))
