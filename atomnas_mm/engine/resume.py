"""Resume a run exactly from any checkpoint, mid-epoch ones included.

mmengine's ``EpochBasedTrainLoop`` resumes at the start of the epoch a
checkpoint was taken in: from a checkpoint saved by iteration it trains the
interrupted epoch's first batches again and so runs past ``max_iters``. And
it does not restore the random state, so even from an epoch boundary the
resumed run draws other augmentations and dropout masks than the
uninterrupted one. :class:`ExactResume` (used by
:class:`atomnas_mm.SafeCheckpointHook`) closes both gaps:

* **Position.** Every checkpoint records how many batches of its epoch were
  trained (``meta['atomnas_resume']``). On resume the batch sampler skips
  that many batches of the interrupted epoch without loading them (the
  sampler's order is a function of seed and epoch), and the loop's batch
  index continues where it stopped, so the killed-and-resumed run ends at
  the same iteration as an uninterrupted one.
* **Random state of the training process.** The CPU, CUDA, numpy and
  Python random states of every rank are stored and restored just before
  training continues (dropout, stochastic depth, anything a hook draws).
  The dataloader's per-iterator seed is drawn from its own generator, not
  the global one, so starting an epoch's iterator consumes no global draw.
* **Random state of data loading.** Augmentations draw from the global RNGs
  of whichever process loads a sample (a worker, or the training process
  with ``num_workers=0``); mmengine seeds each worker once per worker
  (``seed + worker_id``), so a resumed run replays other draws. Each sample
  is instead loaded with the RNGs seeded from ``(seed, epoch, index)``, and
  the loading process's own states are put back after it: a sample's
  augmentation depends on nothing but the seed, the epoch and its index,
  whatever the number of workers, their order or a resume.

Only for ``EpochBasedTrainLoop`` (and subclasses) for the position; the
seeding works for any loop whose dataloader has a batch sampler.
"""
import random

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.runner import EpochBasedTrainLoop

META_KEY = 'atomnas_resume'


class EpochIndex(int):
    """A dataset index that carries the epoch it is drawn for."""

    def __new__(cls, value, epoch):
        self = super().__new__(cls, value)
        self.epoch = epoch
        return self

    def __reduce__(self):
        return EpochIndex, (int(self), self.epoch)


def sample_seed(seed, epoch, index):
    """The seed a sample is loaded with: a hash of the three numbers."""
    return int(np.random.SeedSequence(
        [int(seed) % 2**63, int(epoch), int(index)]).generate_state(1)[0])


class SeededGetitems:
    """``dataset.__getitems__`` that loads each sample with seeded RNGs.

    torch's fetcher calls ``dataset.__getitems__(indices)`` when it exists
    (an instance attribute will do). The global numpy, Python and torch
    (CPU) random states of the loading process are put back after each
    sample.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __call__(self, indices):
        return [self.load(i) for i in indices]

    def load(self, index):
        epoch = getattr(index, 'epoch', 0)
        seed = sample_seed(self.seed, epoch, index)
        states = (np.random.get_state(), random.getstate(),
                  torch.random.default_generator.get_state())
        np.random.seed(seed)
        random.seed(seed)
        torch.random.default_generator.manual_seed(seed)
        try:
            return self.dataset[int(index)]
        finally:
            np.random.set_state(states[0])
            random.setstate(states[1])
            torch.random.default_generator.set_state(states[2])


class ResumableBatches:
    """A batch sampler that tags indices with the epoch and can skip the
    batches a resumed epoch has trained already (without loading them)."""

    def __init__(self, batch_sampler, epoch_of):
        self.batch_sampler, self.epoch_of = batch_sampler, epoch_of
        self.skip = 0

    def __iter__(self):
        epoch, skip = self.epoch_of(), self.skip
        self.skip = 0
        for n, batch in enumerate(self.batch_sampler):
            if n >= skip:
                yield [EpochIndex(i, epoch) for i in batch]

    def __len__(self):
        return len(self.batch_sampler)

    def __getattr__(self, name):
        if 'batch_sampler' not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__['batch_sampler'], name)


def _rng_state():
    state = dict(torch=torch.get_rng_state(),
                 python=_plain(random.getstate()))
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state['numpy'] = dict(kind=kind, keys=torch.from_numpy(
        keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
        cached=float(cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _plain(value):
    """Tuples of ints as lists (what weights_only loads everywhere)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(_tuples(state['python']))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32),
                         n['pos'], n['has_gauss'], n['cached']))
    if 'cuda' in state and torch.cuda.is_available():
        states = state['cuda']
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


class ExactResume:
    """The position-and-random-state bookkeeping of one Runner (see the
    module docstring); a hook calls its methods from the hook points of the
    same names."""

    def __init__(self):
        self.done = 0        # batches of the current epoch trained
        self.offset = 0      # batch index of the first batch of this epoch
        self.pending = None  # what a loaded checkpoint asks for
        self.states = None   # every rank's random state, gathered
        self.batches = None

    # -- before_train ----------------------------------------------------
    def before_train(self, runner):
        loop = runner.train_loop
        loader = getattr(loop, 'dataloader', None)
        if loader is not None and getattr(loader, 'batch_sampler', None) \
                is not None and not isinstance(loader.batch_sampler,
                                               ResumableBatches):
            self.batches = ResumableBatches(loader.batch_sampler,
                                            lambda: self._epoch(runner))
            # DataLoader refuses a new batch_sampler after __init__; its
            # iterators read the attribute afresh every epoch.
            object.__setattr__(loader, 'batch_sampler', self.batches)
            try:
                loader.dataset.__getitems__ = SeededGetitems(loader.dataset,
                                                             runner.seed)
            except AttributeError:  # e.g. __slots__: global RNG streams
                runner.logger.warning(
                    f'{type(loader.dataset).__name__} takes no attribute '
                    '__getitems__: its samples are loaded with the global '
                    'random streams, and a resumed run draws other '
                    'augmentations than an uninterrupted one')
            if loader.generator is None:
                # The per-iterator base seed is drawn from this generator,
                # not from the global one (our workers are seeded per
                # sample): an iterator started on resume draws nothing.
                loader.generator = torch.Generator().manual_seed(
                    runner.seed % 2**63)
        elif isinstance(getattr(loader, 'batch_sampler', None),
                        ResumableBatches):
            self.batches = loader.batch_sampler
        if isinstance(loop, EpochBasedTrainLoop) and \
                'run_iter' not in vars(loop):
            run_iter = loop.run_iter

            def counted_run_iter(idx, data_batch):
                idx += self.offset
                self.done = idx + 1
                return run_iter(idx, data_batch)

            loop.run_iter = counted_run_iter
        pending, self.pending = self.pending, None
        if pending is None:
            return
        states = pending.get('rng') or []
        if len(states) == get_world_size():
            _set_rng_state(states[get_rank()])
        elif states:
            runner.logger.warning(
                f'The checkpoint holds the random state of {len(states)} '
                f'processes, this run has {get_world_size()}: the random '
                'state is not restored (the resumed run draws other dropout '
                'masks than an uninterrupted one would)')
        if pending['skip'] and isinstance(loop, EpochBasedTrainLoop):
            self.offset = self.done = pending['skip']
            if self.batches is not None:
                self.batches.skip = pending['skip']
            runner.logger.info(
                f'Resuming in epoch {loop.epoch + 1} after its batch '
                f'{pending["skip"]} (the batches trained before the '
                'checkpoint are skipped)')

    @staticmethod
    def _epoch(runner):
        sampler = getattr(runner.train_loop.dataloader, 'sampler', None)
        epoch = getattr(sampler, 'epoch', None)
        return runner.train_loop.epoch if epoch is None else epoch

    # -- epochs ----------------------------------------------------------
    def after_train_epoch(self, runner):
        self.offset = self.done = 0

    # -- checkpoints -----------------------------------------------------
    def gather(self):
        """Collect the random state of every rank for the next checkpoint.

        Every rank must call this (mmengine saves on rank 0 only, so the
        collective cannot run in ``before_save_checkpoint``).
        """
        self.states = all_gather_object(_rng_state())

    def before_save_checkpoint(self, runner, checkpoint):
        meta = checkpoint.setdefault('meta', {})
        states, self.states = self.states, None
        if states is None:  # a save nobody gathered for
            states = [_rng_state()] if get_world_size() == 1 else []
        loop = runner.train_loop
        # mmengine stores the epoch in progress for a checkpoint taken
        # within an epoch and the next one at an epoch's end.
        within = (isinstance(loop, EpochBasedTrainLoop)
                  and meta.get('epoch') == loop.epoch)
        meta[META_KEY] = dict(skip=self.done if within else 0, rng=states)

    def after_load_checkpoint(self, runner, checkpoint):
        if not runner._resume:
            return
        state = checkpoint.get('meta', {}).get(META_KEY)
        self.pending = dict(state) if state else None
