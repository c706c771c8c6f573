# Train AtomNAS-C+ from scratch on ImageNet-1k: the AtomNAS-A+ recipe
# (32 GPUs x 128 images, see atomnas-a_plus_in1k.py) with the C+ arch.
_base_ = './atomnas-a_plus_in1k.py'

model = dict(backbone=dict(arch='atomnas_c_plus'))
