"""qcore: the library behind the qcourse labs (quantization and parameter-efficient fine-tuning).

Modules, one idea each: ``formats`` (float/int formats and memory arithmetic), ``quant``
(affine quantization), ``calibrate`` (observers), ``nf4`` (NormalFloat-4), ``measure``
(sizes, latency, memory). Import what you need: ``from qcore.quant import quantize``.
"""

__version__ = "0.1.0"
