"""Write tests/data/mmengine_checkpoint.pth: a checkpoint laid out as mmengine's Runner.save_checkpoint writes it
(``meta``, ``state_dict``, ``message_hub`` with real ``HistoryBuffer`` objects and NumPy values) after cls_KD's
``pth_transfer.py`` (``student.`` keys kept without the prefix, ``optimizer`` removed), with tiny tensors.

Run once with mmengine importable (not a unikd dependency), e.g.:
    pip install --target /tmp/mme --no-deps mmengine==0.10.7 addict yapf termcolor rich markdown-it-py mdurl pygments
    PYTHONPATH=/tmp/mme .venv/bin/python tests/data/make_mmengine_checkpoint.py
"""

from collections import OrderedDict
from pathlib import Path

import mmengine
import numpy as np
import torch
from mmengine.logging import MessageHub

generator = torch.Generator().manual_seed(0)
state_dict = OrderedDict(
    [
        ("backbone.conv1.weight", torch.randn(4, 3, 3, 3, generator=generator)),
        ("backbone.bn1.weight", torch.rand(4, generator=generator)),
        ("backbone.bn1.bias", torch.randn(4, generator=generator)),
        ("backbone.bn1.running_mean", torch.randn(4, generator=generator)),
        ("backbone.bn1.running_var", torch.rand(4, generator=generator)),
        ("backbone.bn1.num_batches_tracked", torch.tensor(1000)),
        ("head.fc.weight", torch.randn(10, 4, generator=generator)),
        ("head.fc.bias", torch.randn(10, generator=generator)),
    ]
)
hub = MessageHub.get_instance("unikd-fixture")
for step, loss in enumerate([2.5, 2.25, np.float64(2.0)]):
    hub.update_scalar("train/loss", loss)
    hub.update_scalar("train/lr", np.float32(0.1), count=step + 1)
hub.update_info("epoch", 3)
hub.update_info("iter", np.int64(1000))
hub.update_info("mean", np.array([123.675, 116.28, 103.53]))
checkpoint = {
    "meta": {
        "epoch": 3,
        "iter": 1000,
        "cfg": "model = dict(type='ImageClassifier')\n",
        "seed": 0,
        "experiment_name": "res34_distill_res18_img",
        "mmengine_version": mmengine.__version__,
        "dataset_meta": {"classes": tuple(f"class{i}" for i in range(10))},
    },
    "state_dict": state_dict,
    "message_hub": hub.state_dict(),
}
out = Path(__file__).with_name("mmengine_checkpoint.pth")
torch.save(checkpoint, out)
print(out, out.stat().st_size, "bytes")
