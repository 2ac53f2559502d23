"""Tests for qcore.calibrate: torch.ao oracles, degenerate data, accumulation, outlier clipping."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.calibrate import MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, _Histogram
from qcore.clipping import EntropyObserver, MSEObserver
from qcore.quant import (MIN_SCALE, PerChannel, PerGroup, PerTensor, choose_qparams,
                         fake_quantize, mse, qparams_from_range)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization is deprecated
    import torch.ao.quantization as tq

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

ALL = [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver,
       EntropyObserver]
HIST = [PercentileObserver, MSEObserver, EntropyObserver]


def batches(seed=0, n=4, shape=(64, 16)):
    """Batches with different locations and spreads, so the running range keeps moving."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + (i - 1.5) for i in range(n)]


def data_mse(x, obs):
    return mse(x, fake_quantize(x, obs.qparams()))


@pytest.fixture(scope="module")
def outliers():
    """1M Gaussian values plus two large outliers (+25, -20): rare enough that clipping pays."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g)
    x[123], x[777] = 25.0, -20.0
    return x


@pytest.fixture(scope="module")
def student_t():
    """Student-t with 3 degrees of freedom: heavy tails with finite variance."""
    torch.manual_seed(0)
    return torch.distributions.StudentT(3.0).sample((200_000,))


# ----------------------------------------------------------------------------- torch oracles
@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_matches_torch(symmetric):
    if symmetric:
        ref = tq.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                quant_min=-127, quant_max=127)
    else:
        ref = tq.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs = MinMaxObserver(bits=8, symmetric=symmetric)
    for x in batches():
        ref(x), obs(x)
        scale, zp = ref.calculate_qparams()
        qp = obs.qparams()
        assert qp.scale.item() == scale.item() and qp.zero_point.item() == zp.item()


@pytest.mark.parametrize("c", [0.01, 0.3])
def test_moving_average_matches_torch(c):
    ref = tq.MovingAverageMinMaxObserver(averaging_constant=c)
    obs = MovingAverageMinMaxObserver(averaging_constant=c)
    for x in batches(n=6):
        ref(x), obs(x)
        scale, zp = ref.calculate_qparams()
        qp = obs.qparams()
        torch.testing.assert_close(qp.scale, scale.reshape(()), rtol=1e-6, atol=0)
        assert qp.zero_point.item() == zp.item()
    assert obs.clip_range()[1].item() != max(x.max().item() for x in batches(n=6))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("moving", [False, True])
def test_per_channel_matches_torch(symmetric, moving):
    kw = (dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127,
               quant_max=127) if symmetric else {})
    if moving:
        ref = tq.MovingAveragePerChannelMinMaxObserver(ch_axis=0, averaging_constant=0.1, **kw)
        obs = MovingAverageMinMaxObserver(0.1, 8, symmetric, PerChannel(0))
    else:
        ref = tq.PerChannelMinMaxObserver(ch_axis=0, **kw)
        obs = MinMaxObserver(8, symmetric, PerChannel(0))
    for x in batches(shape=(8, 4, 3)):
        ref(x), obs(x)
    scale, zp = ref.calculate_qparams()
    qp = obs.qparams()
    assert qp.scale.shape == (8, 1, 1)
    torch.testing.assert_close(qp.scale.flatten(), scale, rtol=1e-6, atol=0)
    assert qp.zero_point.flatten().tolist() == zp.tolist()


def test_per_channel_activations_axis1():
    """Activations [N, C] with varying N: one range per channel along axis 1."""
    ref, obs = tq.PerChannelMinMaxObserver(ch_axis=1), MinMaxObserver(granularity=PerChannel(1))
    for n, x in zip((5, 9, 2), batches(n=3, shape=(9, 6))):
        ref(x[:n]), obs(x[:n])
    torch.testing.assert_close(obs.qparams().scale.flatten(), ref.calculate_qparams()[0],
                               rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- interface
@pytest.mark.parametrize("cls", ALL)
def test_identity_empty_reset(cls):
    obs = cls()
    with pytest.raises(RuntimeError, match="observed no data"):
        obs.qparams()
    x = torch.randn(10, 3)
    assert obs(x) is x and obs.observe(x) is x  # hook-friendly: input passes through
    obs(torch.empty(0))  # empty batches are skipped
    assert obs.num_observed == 60 and obs.qparams().scale.item() > 0
    obs.reset()
    with pytest.raises(RuntimeError):
        obs.qparams()
    with pytest.raises(ValueError, match="NaN"):
        obs(torch.tensor([1.0, float("nan")]))


def test_forward_hook_and_sequential():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    hooked, inline = MinMaxObserver(), MinMaxObserver()
    layer.register_forward_hook(lambda mod, inp, out: hooked(out))
    model = torch.nn.Sequential(layer, inline)
    x = torch.randn(5, 4)
    assert torch.equal(model(x), layer(x))
    assert torch.equal(hooked.qparams().scale, inline.qparams().scale)


@pytest.mark.parametrize("cls", HIST)
def test_histogram_observers_reject_per_channel(cls):
    with pytest.raises(ValueError, match="supports PerTensor only"):
        cls(granularity=PerChannel(0))


def test_argument_checks():
    with pytest.raises(ValueError, match="power of two"):
        EntropyObserver(bins=1000)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=0.0)
    with pytest.raises(ValueError, match="bits"):
        MinMaxObserver(bits=1)
    obs = MinMaxObserver(granularity=PerChannel(0))
    obs(torch.randn(4, 2))
    with pytest.raises(ValueError, match="do not match"):
        obs(torch.randn(5, 2))


def test_per_group_minmax_equals_choose_qparams():
    w = torch.randn(4, 32)
    obs = MinMaxObserver(4, True, PerGroup(8))
    for part in (w * 0.5, w):
        obs(part)
    expected = choose_qparams(w, 4, True, PerGroup(8))
    assert torch.equal(obs.qparams().scale, expected.scale)


# ----------------------------------------------------------------------------- degenerate data
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_constant_input_gives_finite_positive_scale(cls, symmetric, value):
    obs = cls(bits=8, symmetric=symmetric)
    for _ in range(2):
        obs(torch.full((50,), value))
    qp = obs.qparams()
    assert math.isfinite(qp.scale.item()) and qp.scale.item() > 0
    assert qp.qmin <= qp.zero_point.item() <= qp.qmax
    if value == 0.0:
        assert qp.scale.item() == MIN_SCALE
    else:  # the constant itself is an end of the range, so it is represented (almost) exactly
        x_hat = fake_quantize(torch.tensor([value]), qp).item()
        assert x_hat == pytest.approx(value, rel=1e-2)


# ----------------------------------------------------------------------------- histogram
def test_histogram_growth_is_exact_rebinning():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1000, generator=g) * 2 - 1, torch.rand(1000, generator=g) * 7 - 3.5
    h = _Histogram(bins=64)
    h.add(a * 0.5), h.add(a), h.add(b)  # R: max|a|/2 -> doubled -> doubled again...
    assert h.counts.sum() == 3000 and h.R >= 3.5
    direct = _Histogram(bins=64)
    direct.add(torch.tensor([h.R]))  # fixes the final range at once, then one count too many
    direct.add(torch.cat([a * 0.5, a, b]))
    direct.counts[-1] -= 1
    assert direct.R == h.R and torch.equal(h.counts, direct.counts)


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9])
def test_percentile_reads_quantiles(student_t, p):
    x = student_t
    sym, asym = PercentileObserver(p, symmetric=True), PercentileObserver(p)
    sym(x), asym(x)
    width = 2 * x.abs().max().item() / 2048  # at most one (grown) bin of error
    assert sym.clip_range()[1].item() == pytest.approx(
        torch.quantile(x.abs().double(), p / 100).item(), abs=width)
    lo, hi = asym.clip_range()
    assert lo.item() == pytest.approx(torch.quantile(x.double(), 1 - p / 100).item(), abs=width)
    assert hi.item() == pytest.approx(torch.quantile(x.double(), p / 100).item(), abs=width)


def test_percentile_100_is_minmax(student_t):
    obs = PercentileObserver(100.0)
    obs(student_t)
    assert torch.equal(obs.qparams().scale, choose_qparams(student_t).scale)


def test_entropy_unsigned_data_uses_full_grid():
    torch.manual_seed(0)
    x = torch.relu(torch.distributions.StudentT(3.0).sample((50_000,)))
    obs = EntropyObserver(bits=8)
    obs(x)
    lo, hi = obs.clip_range()
    assert lo.item() == 0.0 and 0 < hi.item() < x.max().item()
    assert obs.qparams().zero_point.item() == 0


def test_mse_estimate_matches_true_mse(student_t):
    obs = MSEObserver(bits=4)
    obs(student_t)
    for t in (1.0, 3.0, 10.0):
        true = mse(student_t, fake_quantize(student_t, qparams_from_range(-t, t, bits=4)))
        assert obs.estimate_mse(-t, t).item() == pytest.approx(true, rel=0.02)


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0)])
def test_minmax_batches_equal_at_once(granularity):
    x = torch.cat(batches(n=3, shape=(8, 10)), dim=1)
    once, batched = MinMaxObserver(granularity=granularity), MinMaxObserver(granularity=granularity)
    once(x)
    for part in x.chunk(3, dim=1):
        batched(part)
    assert torch.equal(once.qparams().scale, batched.qparams().scale)
    assert torch.equal(once.qparams().zero_point, batched.qparams().zero_point)


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=40),
       st.integers(1, 5), st.booleans())
@settings(max_examples=40, deadline=None)
def test_minmax_accumulation_property(values, n_parts, symmetric):
    x = torch.tensor(values)
    once, batched = MinMaxObserver(symmetric=symmetric), MinMaxObserver(symmetric=symmetric)
    once(x)
    for part in x.tensor_split(n_parts):
        batched(part)
    assert torch.equal(once.qparams().scale, batched.qparams().scale)
    assert torch.equal(once.qparams().zero_point, batched.qparams().zero_point)


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=40), st.booleans(),
       st.sampled_from([PercentileObserver, MSEObserver, EntropyObserver]))
@settings(max_examples=30, deadline=None)
def test_histogram_qparams_are_valid(values, symmetric, cls):
    obs = cls(bits=4, symmetric=symmetric, bins=256) if cls is not EntropyObserver else \
        cls(bins=256, bits=4, symmetric=symmetric)
    obs(torch.tensor(values))
    qp = obs.qparams()
    lo, hi = obs.clip_range()
    if symmetric:  # [-T, T] with T no larger than max|x|
        assert -lo.item() == hi.item() <= max(abs(v) for v in values)
    else:  # inside the data range widened to contain 0 (as qparams_from_range does)
        assert min(min(values), 0) <= lo.item() <= hi.item() <= max(max(values), 0)
    assert math.isfinite(qp.scale.item()) and qp.scale.item() > 0
    assert qp.qmin <= qp.zero_point.item() <= qp.qmax


@pytest.mark.parametrize("cls,tol", [(PercentileObserver, 0.01), (MSEObserver, 0.01),
                                     (EntropyObserver, 0.25)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_histogram_batches_close_to_at_once(student_t, cls, tol, symmetric):
    """Batches whose max grows force the histogram to double its range (coarser bins)."""
    x = torch.cat([student_t[:50_000] * 0.25, student_t[50_000:]])  # batch 1 is narrow
    once, batched = cls(symmetric=symmetric), cls(symmetric=symmetric)
    once(x)
    for part in x.tensor_split([50_000, 120_000]):
        batched(part)
    assert batched.hist.R > once.hist.R  # the batched histogram did grow past max|x|
    s_once, s_batched = once.qparams().scale.item(), batched.qparams().scale.item()
    assert s_batched == pytest.approx(s_once, rel=tol)
    assert data_mse(x, batched) == pytest.approx(data_mse(x, once), rel=tol)


# ----------------------------------------------------------------------------- clipping pays
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_observers_beat_minmax_on_outliers(outliers, bits, symmetric):
    x = outliers
    errors = {}
    for cls in [MinMaxObserver] + HIST:
        obs = cls(bits=bits, symmetric=symmetric)
        for part in x.chunk(3):
            obs(part)
        errors[cls.__name__] = data_mse(x, obs)
    minmax = errors.pop("MinMaxObserver")
    for name, err in errors.items():
        assert err < 0.5 * minmax, (name, err, minmax)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("data", ["outliers", "student_t"])
def test_mse_observer_beats_minmax_and_percentiles(request, data, bits, symmetric):
    x = request.getfixturevalue(data)
    obs = MSEObserver(bits=bits, symmetric=symmetric)
    for part in x.chunk(3):
        obs(part)
    best = data_mse(x, obs)
    rivals = {"minmax": mse(x, fake_quantize(x, choose_qparams(x, bits, symmetric)))}
    for p in (99.0, 99.9, 99.99, 99.999):
        rival = PercentileObserver(p, bits, symmetric)
        rival(x)
        rivals[p] = data_mse(x, rival)
    # The search is exact on the histogram; the data differ from it by under a bin width.
    assert best <= 1.01 * min(rivals.values()), (best, rivals)
