"""The bundled sample: a CIFAR ResNet-20 trained on scikit-learn's digits, and the digits in CIFAR format.

`SAMPLE_MODEL` is what every command uses when no `-m` is given and no project configures a model.
"""

from pathlib import Path

SAMPLE_MODEL = Path(__file__).parent / "resnet20_digits.pt"
