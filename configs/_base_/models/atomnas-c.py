# model settings: AtomNAS-C (ReLU, 32-channel stem): AtomNAS-A's model with
# another architecture.
_base_ = './atomnas-a.py'

model = dict(backbone=dict(arch='atomnas_c'))
