# model settings: AtomNAS-A+ (docs/method.md, "Zoo"): the A rows with Swish,
# squeeze-excite 0.5 (both come with the arch) and dropout 0.28.
_base_ = './atomnas-a.py'

model = dict(
    backbone=dict(arch='atomnas_a_plus'), head=dict(dropout_rate=0.28))
