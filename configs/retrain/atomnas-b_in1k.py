# Train AtomNAS-B from scratch on ImageNet-1k: the AtomNAS-A recipe
# (see atomnas-a_in1k.py) with the B architecture.
_base_ = './atomnas-a_in1k.py'

model = dict(backbone=dict(arch='atomnas_b'))
