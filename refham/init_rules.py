"""The Mixer's initialisation rules, :eq:`X-init` (timm's MlpMixer, as the paper's code uses
it): `initial_value` says which parameter gets which rule. Each rule draws from a numpy
Generator on the host; `Mixer.init` applies `initial_value` to the parameters in state_dict
order, so a seed fixes every number on every backend.
"""
import math

import numpy
import scipy.stats

TRUNC_NORMAL_STD = 0.87962566103423978  # std of a standard normal truncated to (−2, 2)


def xavier_uniform(shape, generator):
    """W ~ U(−a, a), a = √(6/(fan_in + fan_out)), for a Linear weight (out, in): torch's
    ``xavier_uniform_`` with fan_in = in, fan_out = out."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return generator.uniform(-bound, bound, size=shape)


def lecun_normal(shape, generator):
    """timm's ``lecun_normal_`` for a conv kernel (out, in, p, p): a standard normal truncated to
    (−2, 2), scaled to standard deviation √(1/fan_in), fan_in = in·p·p."""
    std = math.sqrt(1.0 / math.prod(shape[1:])) / TRUNC_NORMAL_STD
    return std * scipy.stats.truncnorm.rvs(-2.0, 2.0, size=shape, random_state=generator)


def initial_value(name, shape, generator):
    """The initial value of parameter `name` (implements :eq:`X-init`; timm's MlpMixer and the paper's
    code), drawn from the numpy Generator `generator`:

        every bias (stem, MLPs, norms, head), head.weight    zeros
        layer-norm weights (blocks.{i}.norm*, norm)           ones
        stem.proj.weight                                      lecun_normal
        every other weight (the MLPs' fc1, fc2)               xavier_uniform
    """
    layer = name.split(".")[-2]
    if name.endswith(".bias") or name == "head.weight":
        return numpy.zeros(shape)
    if layer.startswith("norm"):
        return numpy.ones(shape)
    if name == "stem.proj.weight":
        return lecun_normal(shape, generator)
    return xavier_uniform(shape, generator)
