"""The PyTorch ResNet18 (CIFAR stem) that scripts/benchmark.py times beside rotjax's:
torchvision's BasicBlock layout with rotjax's layer widths (models.py), so that both
frameworks run the same convolutions, BatchNorms and head."""

import torch
import torch.nn as tnn
import torch.nn.functional as F


class Block(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = tnn.Sequential(
        tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
      )

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(tnn.Module):
  def __init__(self, width=64, classes=10):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    layers, cin = [], width
    for i in range(4):
      cout = width * 2**i
      layers.append(
        tnn.Sequential(
          Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)
        )
      )
      cin = cout
    self.layers = tnn.Sequential(*layers)
    self.fc = tnn.Linear(cin, classes)

  def forward(self, x):
    x = self.layers(F.relu(self.bn1(self.conv1(x))))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
