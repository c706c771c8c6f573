# model settings: AtomNAS-C+ (Swish, SE 0.5, dropout 0.28): AtomNAS-A+'s
# model with another architecture.
_base_ = './atomnas-a_plus.py'

model = dict(backbone=dict(arch='atomnas_c_plus'))
