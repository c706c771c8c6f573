# model settings: AtomNAS-A (ReLU, 16-channel stem)
# ``atomnas_mm.AtomNAS`` resolves from the mmpretrain scope through the
# atomnas_mm registry (``locations``); ``custom_imports`` makes it explicit.
custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(type='atomnas_mm.AtomNAS', arch='atomnas_a'),
    neck=dict(type='GlobalAveragePooling'),
    # Dropout 0.2 before the FC (docs/method.md, "Recipe"): mmpretrain's LinearClsHead
    # has none, atomnas_mm's DropoutLinearClsHead adds it.
    head=dict(
        type='atomnas_mm.DropoutLinearClsHead',
        dropout_rate=0.2,
        num_classes=1000,
        in_channels=1280,
        loss=dict(
            type='LabelSmoothLoss',
            label_smooth_val=0.1,
            mode='original',
            loss_weight=1.0),
        topk=(1, 5),
    ))
