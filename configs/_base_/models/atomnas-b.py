# model settings: AtomNAS-B (ReLU, 32-channel stem): AtomNAS-A's model with
# another architecture.
_base_ = './atomnas-a.py'

model = dict(backbone=dict(arch='atomnas_b'))
