# Train AtomNAS-C from scratch on ImageNet-1k: the AtomNAS-A recipe
# (see atomnas-a_in1k.py) with the C architecture.
_base_ = './atomnas-a_in1k.py'

model = dict(backbone=dict(arch='atomnas_c'))
