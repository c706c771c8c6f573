"""AtomShrinkHook under 2-process CPU DDP (gloo)."""
import os.path as osp

import pytest
import torch

from harness import (SCHEDULE, KillAtomsHook, build, ddp_cfg, make_cfg,
                     spawn_cpu_ddp)


def _worker(rank, work_dir):
    cfg = ddp_cfg(make_cfg(work_dir, max_epochs=2))
    runner = build(cfg, [KillAtomsHook(SCHEDULE)])
    runner.train()
    model = runner.model
    assert type(model).__name__ == 'MMDistributedDataParallel'
    params = {id(p) for p in model.module.parameters()}
    assert {id(p) for p in model.parameters()} == params
    torch.save(dict(rows=model.module.backbone.arch_rows(),
                    state={k: p.detach() for k, p in
                           model.module.named_parameters()}),
               osp.join(work_dir, f'rank{rank}.pth'))


@pytest.mark.slow
def test_ddp_ranks_shrink_identically(tmp_path):
    spawn_cpu_ddp(_worker, str(tmp_path))
    r0 = torch.load(tmp_path / 'rank0.pth', weights_only=True)
    r1 = torch.load(tmp_path / 'rank1.pth', weights_only=True)
    assert r0['rows'] == r1['rows']
    assert r0['rows'][1][3] == [3, 7] and r0['rows'][2][3] == []
    # Parameters stay bit-identical (BN buffers are per rank:
    # broadcast_buffers=False).
    assert r0['state'].keys() == r1['state'].keys()
    for k, v in r0['state'].items():
        assert torch.equal(v, r1['state'][k]), k
