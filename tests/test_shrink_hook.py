"""AtomShrinkHook through a real mmengine Runner: shrink, resume, reload."""
import copy
import json
import os.path as osp
import shutil

import pytest
import torch

import atomnas_mm  # noqa: F401
from atomnas_mm.engine.hooks import AtomShrinkHook

from harness import (ROWS, SCHEDULE, KillAtomsHook, RecordHook, build,
                     make_cfg)


def test_search_resume_and_reload(tmp_path):
    full_dir = str(tmp_path / 'full')
    record = RecordHook()
    runner = build(make_cfg(full_dir), [KillAtomsHook(SCHEDULE), record])
    runner.train()
    backbone = runner.model.backbone
    rows = backbone.arch_rows()
    assert rows[1][3:5] == [[3, 7], [6, 6]]      # k5 removed at epoch 0
    assert rows[2][3:5] == [[], []]              # emptied residual block
    assert rows[3][3:5] == [[5], [8]]            # k3 removed at epoch 1
    # The optimizer holds exactly the model's (new) parameters.
    assert runner.optim_wrapper.optimizer.param_groups[0]['params'] == \
        list(runner.model.parameters())
    ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
    assert ema.ema_model.module.backbone.arch_rows() == rows
    # Bookkeeping: json in work_dir, arch in checkpoint meta.
    with open(osp.join(full_dir, 'searched_arch.json')) as f:
        assert json.load(f)['backbone']['rows'] == rows
    ckpt = torch.load(osp.join(full_dir, 'epoch_1.pth'), weights_only=True)
    assert ckpt['meta']['atomnas_arch']['backbone']['rows'][1][3] == [3, 7]
    final_state = {k: v.clone() for k, v in runner.model.state_dict().items()}

    # Resume from epoch 1 (after the first shrink): same losses, same weights.
    resume_dir = str(tmp_path / 'resume')
    shutil.copytree(full_dir, resume_dir)
    resumed_record = RecordHook()
    runner2 = build(make_cfg(resume_dir, resume=True,
                             load_from=osp.join(resume_dir, 'epoch_1.pth')),
                    [KillAtomsHook(SCHEDULE), resumed_record])
    runner2.train()
    n = len(resumed_record.losses)
    assert n == 8
    assert resumed_record.losses == pytest.approx(record.losses[-n:],
                                                  rel=1e-5, abs=1e-6)
    # The shrink history (flops.png) survives the resume.
    def shrinks(r):
        hook = [h for h in r.hooks if isinstance(h, AtomShrinkHook)][0]
        return [(e['iter'], e['flops']) for e in hook.history
                if e['removed_atoms'] is not None]
    assert len(shrinks(runner)) == 2 and shrinks(runner2) == shrinks(runner)
    state2 = runner2.model.state_dict()
    assert state2.keys() == final_state.keys()
    for k, v in final_state.items():
        assert torch.allclose(v.float(), state2[k].float(), atol=1e-5), k

    # Test-time loading with the unedited search config reshapes the model.
    runner3 = build(make_cfg(str(tmp_path / 'test'),
                             load_from=osp.join(full_dir, 'epoch_3.pth'),
                             test_dataloader=make_cfg('')['val_dataloader'],
                             test_evaluator=dict(type='Accuracy'),
                             test_cfg=dict()))
    metrics = runner3.test()
    assert 'accuracy/top1' in metrics
    assert runner3.model.backbone.arch_rows() == rows


def test_mismatched_checkpoint_raises(tmp_path):
    runner = build(make_cfg(str(tmp_path / 'a'), max_epochs=1))
    runner.train()
    narrow = copy.deepcopy(ROWS)
    narrow[1] = [12, 1, 2, [3, 5, 7], [2, 2, 2], True]
    runner2 = build(make_cfg(str(tmp_path / 'b'), max_epochs=1, rows=narrow,
                             load_from=osp.join(str(tmp_path / 'a'),
                                                'epoch_1.pth')))
    with pytest.raises(ValueError, match='kernel 3 needs 6 atoms'):
        runner2.train()


def test_narrowing_on_load_without_the_hook_is_refused(tmp_path):
    """load_from a shrunk checkpoint into the supernet of a config without
    AtomShrinkHook: the optimizer would keep the old tensors, so training
    refuses to start and says what to do."""
    runner = build(make_cfg(str(tmp_path / 'a'), max_epochs=1),
                   [KillAtomsHook(SCHEDULE)])
    runner.train()
    cfg = make_cfg(str(tmp_path / 'b'), max_epochs=1,
                   load_from=osp.join(str(tmp_path / 'a'), 'epoch_1.pth'))
    cfg['custom_hooks'] = [dict(type='atomnas_mm.BNL1PenaltyHook', rho=0,
                                weight_decay=1e-4)]
    record = RecordHook()
    with pytest.raises(ValueError, match='narrowed itself to the loaded '
                       'checkpoint .* add atomnas_mm.AtomShrinkHook'):
        build(cfg, [record]).train()
    assert record.losses == []
