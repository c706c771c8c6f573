# dataset settings: ImageNet-1k as in AtomNAS (docs/method.md, "Recipe").
# Train: Inception-style random crop (scale 0.08-1, min covered 0.1, centre
# crop with padding 32 as fallback), bicubic resize to 224, horizontal flip.
# Test: centre crop of 224/(224+32) of the short side, bicubic resize to 224.
dataset_type = 'ImageNet'
# The one place to set the data root (``train/``, ``val/``, ``meta/``). From
# the command line, override ``train_dataloader.dataset.data_root`` and
# ``val_dataloader.dataset.data_root`` (test_dataloader is val_dataloader).
data_root = 'data/imagenet'
# How LoadImageFromFile reads images (both pipelines): None reads the files
# under data_root. To read an LMDB packed by
# ``tools/dataset_converters/imagenet_to_lmdb.py data/imagenet
# data/imagenet.lmdb`` (lists still read from data_root/meta), set
# backend_args = dict(backend='lmdb', db_path=data_root + '.lmdb')
backend_args = None

data_preprocessor = dict(
    num_classes=1000,
    # RGB format normalization parameters
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    # convert image from BGR to RGB
    to_rgb=True,
)

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(
        type='EfficientNetRandomCrop',
        scale=224,
        min_covered=0.1,
        crop_padding=32,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]

test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(
        type='EfficientNetCenterCrop',
        crop_size=224,
        crop_padding=32,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=64,
    num_workers=8,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='train',
        pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)

val_dataloader = dict(
    batch_size=64,
    num_workers=8,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='val',
        pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, 5))

# If you want standard test, please manually configure the test dataset
test_dataloader = val_dataloader
test_evaluator = val_evaluator
