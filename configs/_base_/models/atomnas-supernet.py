# model settings: the AtomNAS search space (docs/method.md, "Search space"; 32-channel
# stem, set stem_channels=16 for the AtomNAS-A search), dropout 0.2.
_base_ = './atomnas-a.py'

model = dict(backbone=dict(arch='supernet'))
