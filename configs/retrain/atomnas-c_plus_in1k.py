# Train AtomNAS-C+ from scratch on ImageNet-1k: see atomnas-a_plus_in1k.py.
_base_ = './atomnas-a_plus_in1k.py'

model = dict(backbone=dict(arch='atomnas_c_plus'))
