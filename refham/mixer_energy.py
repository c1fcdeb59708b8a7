"""The SymMixer block as a gradient system (:ref:`sec-mixer-energy`), the AsymMixer pseudo-energy
and the symmetry measures of trained MLPs (:eq:`M-symmetry`).

One parallel block of a SymMixer, g = LN(x), x ← x + u(g), is the unit Euler step of

    (M1)  F(g) = Σ G(W_t g) + Σ G(g W_cᵀ)       token hidden (N_s, C), channel hidden (S, N_c)
    (M2)  E(x) = ⟨x, g⟩ − L_v(x) − F(g)           L_v: the layernorm Lagrangian, scalar γ
    (M3)  dx/dt = u(g) − κx,  u = ∇_g F           κ = 1: HAM dynamics, κ = 0: skip connection
    (M4)  κ = 1: dE/dt = −⟨ẋ, H_v ẋ⟩ ≤ 0;   κ = 0: E₀ = −F(g), dE₀/dt = −⟨u, J u⟩

where J = ∂g/∂x. With a scalar γ > 0, J = H_v (symmetric, ⪰ 0) and both rates are ≤ 0. With the
paper's per-element affine g = γ⊙x̂ + δ, J v = γ⊙(H₀v), H₀ the Hessian of the γ = 1 layernorm
Lagrangian: dE₀/dt = −⟨u, γ⊙H₀u⟩ = −⟨γ⊙u, H₀u⟩ is not a negative semidefinite form, no Lagrangian
(hence no E) exists, and E₀ can rise (tests/test_mixer_energy.py holds found examples).

    MixerBlock(config, params, block=0).unit_step(x)       # default affine: the model's block
    block = MixerBlock(config, params, block=0, affine="scalar")            # energy-exact
    traj = block.integrate(x0, dt=0.01, n_steps=100, kappa=1)  # traj.energies: E per step (n+1, B)
    block.energy0(x), block.energy0_rate(x, kappa=0)           # with either affine
    symmetry_measures(config, params)   # {"blocks.0.mlp_tokens.cos": 1.0, …} for the JSONL log

States x are (B, S, C) arrays; energies and rates are (B,).
"""
import math
import numbers
import operator

from refham.errors import RefhamError
from refham.backend import asarray, to_numpy, xp
from refham.special import gelu
from refham.blocks import BRANCH_AXIS
from refham.dynamics import euler_step, integrate
from refham.lagrangians import GELU, LayerNorm
from refham.layers import layernorm_forward, linear_forward
from refham.mixer import Mixer, MixerConfig, check_params

AFFINES = ("scalar", "per_element")
_MODEL_AFFINE = {"element": "per_element", "scalar": "scalar"}  # MixerConfig.norm_affine → affine
KAPPAS = (0, 1)
RECORDS = ("lyapunov_energy", "pseudo_energy", "energy0")
_NORM_AXES = {"joint": (-2, -1), "channel": (-1,)}
_HIDDEN = GELU()


class EnergyError(RefhamError, ValueError):
    """An energy was asked of a block that has none, or with invalid arguments."""


def _inner(a, b):
    """⟨a, b⟩ per sample over the (S, C) axes; shape (B,)."""
    return xp.sum(a * b, axis=(-2, -1))


class MixerBlock:
    """One parallel block of a SymMixer (or AsymMixer) as a continuous-time system in x (B, S, C).

    affine=None (the default): the model's own layer norm, so `unit_step` is the trained block
    itself: per-element γ, δ for the paper's models (config.norm_affine 'element', or no such
    field), the scalar γ of an energy-exact model (norm_affine 'scalar').
    affine="per_element": the paper's γ, δ as trained; then only E₀, its rate and the dynamics
    exist (g has no Lagrangian).
    affine="scalar" (energy-exact): γ is the mean of the block's norm weight (exactly the model
    where that weight is uniform, e.g. at initialisation or in an energy-exact model; otherwise a
    different block), δ the model's bias (a per-element δ keeps a Lagrangian:
    L_v = γDσ + ⟨δ, x⟩); then the Lyapunov energy E (M2) and its rate exist too.
    AsymMixer blocks have the pseudo-energy (`pseudo_energy`, scalar affine) and the dynamics.

    Step size (SymMixer, scalar γ > 0): along the exact flow of (M3) E (κ = 1) and E₀ (κ = 0)
    never rise (M4). A discrete Euler step x' = x + dt(u − x) (κ = 1) provably does not raise E
    when dt ≤ 1/(1 + ρM/2), where ρ = c·(‖W_t‖₂² + ‖W_c‖₂²) bounds the negative curvature of F
    (c = −min GELU′ = 0.1289, at z = −√2) and M = γ/√ε bounds H_v. Proof, g' = g(x'): with
    E = L_v*(g) − F(g), convexity of L_v* and ∇²F ⪰ −ρ give E(x') − E(x) ≤ ⟨x' − u, g' − g⟩ +
    (ρ/2)‖g' − g‖², where x' − u = −((1 − dt)/dt)(x' − x); and ⟨x' − x, g' − g⟩ ≥ ‖g' − g‖²/M
    (co-coercivity of ∇L_v). For a convex F (ρ = 0) that is every dt ≤ 1; with GELU's
    non-convex G and ε = 1e-6 the bound is tiny; what larger steps do is measured in
    :ref:`sec-ham-step-size`. The unit step with κ = 0 (the block itself) can raise E₀
    (tests/test_mixer_energy.py holds an example).
    """

    def __init__(self, config, params, block, affine=None):
        if not isinstance(config, MixerConfig):
            raise TypeError(f"MixerBlock needs a MixerConfig (see make_config), got {type(config)}")
        if config.mlp_kind not in ("sym", "asym"):
            raise EnergyError(f"model {config.model!r} has untied MLPs and no block energy: use "
                              f"symmixer (energy, E₀) or asymmixer (pseudo-energy)")
        if affine is None:
            affine = _MODEL_AFFINE[getattr(config, "norm_affine", "element")]
        if affine not in AFFINES:
            raise EnergyError(f"unknown affine {affine!r}: choose one of {', '.join(AFFINES)} "
                              f"(or None: the model's own)")
        try:
            block = operator.index(block)
        except TypeError:
            raise EnergyError(f"block must be an integer index, got {block!r}") from None
        if not 0 <= block < config.depth:
            raise EnergyError(f"block {block} does not exist: the model has blocks "
                              f"0..{config.depth - 1}")
        self._mixer, self._params = Mixer(config), params
        check_params(self._mixer.param_shapes, params)
        self.config, self.block, self.affine = config, block, affine
        weight, self.delta = (params[f"blocks.{block}.norm.{p}"] for p in ("weight", "bias"))
        self._branches = [(axis, self._mixer.mlp_weights(params, block, mlp))
                          for mlp, axis in BRANCH_AXIS.items()]
        own = [weight, self.delta] + [w for _, ws in self._branches for w in ws.values()]
        if not all(bool(xp.all(xp.isfinite(a))) for a in own):
            raise EnergyError(f"block {block}'s parameters contain NaN or inf")
        w_in = "fc2.weight" if config.mlp_kind == "sym" else "fc1.weight"
        self._w_in = [(axis, weights[w_in]) for axis, weights in self._branches]
        self._axes = _NORM_AXES[config.norm]
        self._unit_norm = LayerNorm(gamma=1.0, eps=config.ln_eps, axes=self._axes)
        if affine == "per_element":
            self.gamma, self.lagrangian = weight, None
        else:
            gamma = float(to_numpy(xp.mean(weight)))
            if not gamma > 0:
                raise EnergyError(f"the scalar (energy-exact) γ is the mean of the block's norm "
                                  f"weight, here {gamma} ≤ 0: the layernorm Lagrangian needs "
                                  f"γ > 0; use affine='per_element' for E₀ only")
            self.gamma = asarray(gamma, dtype=weight.dtype)
            self.lagrangian = LayerNorm(gamma=gamma, delta=self.delta, eps=config.ln_eps,
                                        axes=self._axes)

    @property
    def symmetric(self):
        """True for a SymMixer block (u = ∇F), False for an AsymMixer block."""
        return self.config.mlp_kind == "sym"

    # -- checks
    def _check_state(self, x, what="x"):
        """x is a finite (B, S, C) block state."""
        expected = (self.config.num_tokens, self.config.dim)
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 3 or shape[1:] != expected:
            raise EnergyError(f"{what} must be a block state (B, S, C) = (B, {expected[0]}, "
                              f"{expected[1]}), got shape {shape}")
        if not bool(xp.all(xp.isfinite(x))):
            raise EnergyError(f"{what} contains NaN or inf")

    def _require_symmetric(self):
        """Energies (other than the asym pseudo-energy) need u = ∇F: a SymMixer block."""
        if not self.symmetric:
            raise EnergyError("an AsymMixer block (W₂ ≠ 0) has no energy: ∂u/∂g is not "
                              "symmetric; use `pseudo_energy` or the dynamics")

    def _require_lagrangian(self):
        """E (M2) needs the layernorm Lagrangian L_v: the scalar affine."""
        if self.lagrangian is None:
            raise EnergyError("E (M2) and the asym pseudo-energy need the Lagrangian L_v, which "
                              "the per-element affine lacks (∂g/∂x is not symmetric): use "
                              "affine='scalar' (γ = the mean of the norm weight), or energy0")

    # -- the block's pieces
    def activation(self, x):
        """g = γ⊙x̂ + δ, x̂ = (x − x̄)/σ over the norm's axes (the model's own LN)."""
        return layernorm_forward(x, self.gamma, self.delta, self.config.ln_eps,
                                 len(self._axes))[0]

    def update(self, g):
        """u(g) = T(g) + Ch(g), the model's block update (sym: u = ∇_g F(g))."""
        return self._mixer.block_update(self._params, self.block, g)

    def hidden_lagrangian(self, g):
        """Implements :eq:`M1`: F(g) = Σ G(W_t g) + Σ G(g W_cᵀ) with the MLPs' input matrices
        (asym: W₁)."""
        return sum(_HIDDEN.value(linear_forward(g, w, axis=axis)[0], event_ndim=2)
                   for axis, w in self._w_in)

    def norm_jvp(self, x, v):
        """J v = (∂g/∂x) v = γ⊙(H₀ v), H₀v = (1/σ)(Pv − x̂⟨x̂, Pv⟩/D) (the γ = 1 layernorm
        Hessian); = H_v v for a scalar γ."""
        return self.gamma * self._unit_norm.hvp(x, v)

    def velocity(self, x, kappa):
        """Implements :eq:`M3`: ẋ = u(g) − κx."""
        return self.update(self.activation(x)) - _kappa(kappa) * x

    def unit_step(self, x):
        """x + u(g): the Euler step of :eq:`M3` with κ = 0 and dt = 1; with the default affine the
        model's block itself. It can raise E₀ even with a scalar γ (see the class docstring)."""
        self._check_state(x)
        return euler_step(lambda state: self.velocity(state, 0), x, 1.0)

    # -- energies and their rates
    def _legendre_minus_hidden(self, x):
        """⟨x, g⟩ − L_v(x) − F(g), with ⟨x, g⟩ − L_v = −γDε/σ in closed form."""
        self._require_lagrangian()
        return self.lagrangian.neuron_energy(x, event_ndim=2) - self.hidden_lagrangian(
            self.activation(x))

    def lyapunov_energy(self, x):
        """E(x) = ⟨x, g⟩ − L_v(x) − F(g). Implements :eq:`M2`: the SymMixer block's energy, non-increasing
        along the flow of (M3) with κ = 1, :eq:`M4`. SymMixer and scalar affine only."""
        self._check_state(x)
        self._require_symmetric()
        return self._legendre_minus_hidden(x)

    def pseudo_energy(self, x):
        """Implements :eq:`M-pseudo`: E(x) + ½⟨g, W₂ᵗᵒᵏ GELU(W₁ᵗᵒᵏ g)⟩ + ½⟨g, GELU(g W₁ᶜʰᵀ)W₂ᶜʰᵀ⟩, E the
        Lyapunov energy's form with W = W₁, and the + sign the paper uses (so that plots compare
        with the paper's). Not a Lyapunov function: it can rise along the dynamics
        (:ref:`sec-mixer-energy`). AsymMixer and scalar affine only."""
        self._check_state(x)
        if self.symmetric:
            raise EnergyError("pseudo_energy is the AsymMixer's; a SymMixer block has a true "
                              "energy: use lyapunov_energy")
        g = self.activation(x)
        return self._legendre_minus_hidden(x) + 0.5 * _inner(g, self._breaking_update(g))

    def _breaking_update(self, g):
        """W₂ᵗᵒᵏ GELU(W₁ᵗᵒᵏ g) + GELU(g W₁ᶜʰᵀ) W₂ᶜʰᵀ, the asym MLPs' symmetry-breaking part."""
        return sum(linear_forward(gelu(linear_forward(g, w["fc1.weight"], axis=axis)[0]),
                                  w["fc2.weight"], axis=axis)[0] for axis, w in self._branches)

    def energy0(self, x):
        """:eq:`M4` E₀(x) = −F(g(x)), for either affine."""
        self._check_state(x)
        self._require_symmetric()
        return -self.hidden_lagrangian(self.activation(x))

    def dEdg(self, x):
        """∂E/∂g = x − u(g) of the block energy :eq:`M2` (the Legendre term gives x, −F gives
        −∇F = −u; the HAM's :eq:`H2` with the hidden layers eliminated)."""
        self._check_state(x)
        self._require_symmetric()
        self._require_lagrangian()
        return x - self.update(self.activation(x))

    def lyapunov_energy_rate(self, x, kappa):
        """dE/dt = ⟨∂E/∂g, H_v ẋ⟩ = ⟨x − u, H_v ẋ⟩ along (M3); for κ = 1, x − u = −ẋ and
        dE/dt = −⟨ẋ, H_v ẋ⟩ ≤ 0. Implements :eq:`M4`."""
        self._check_state(x)
        self._require_symmetric()
        self._require_lagrangian()
        u = self.update(self.activation(x))
        return _inner(x - u, self.norm_jvp(x, u - _kappa(kappa) * x))

    def energy0_rate(self, x, kappa):
        """dE₀/dt = −⟨u, J ẋ⟩ = −⟨u, γ⊙H₀(u − κx)⟩; for κ = 0: −⟨u, γ⊙H₀u⟩, which is
        −⟨u, H_v u⟩ ≤ 0 for a scalar γ > 0 and indefinite for a per-element γ."""
        self._check_state(x)
        self._require_symmetric()
        u = self.update(self.activation(x))
        return -_inner(u, self.norm_jvp(x, u - _kappa(kappa) * x))

    # -- trajectories
    def integrate(self, x0, dt, n_steps, kappa=1, method="rk4", record=None):
        """n_steps fixed steps of :eq:`M3` by dynamics.integrate ("rk4" | "euler"), recording
        `record` ("lyapunov_energy", "pseudo_energy" or "energy0"); by default the Lyapunov
        function of κ: E for κ = 1 (the pseudo-energy for an AsymMixer block), E₀ for κ = 0.
        E needs affine="scalar". Returns a dynamics.Trajectory."""
        self._check_state(x0, "x0")
        kappa = _kappa(kappa)
        if record is None and kappa == 1:
            record = "lyapunov_energy" if self.symmetric else "pseudo_energy"
        record = record or "energy0"
        if record not in RECORDS:
            raise EnergyError(f"unknown record {record!r}: choose one of {', '.join(RECORDS)}")
        energy = getattr(self, record)
        energy(x0)  # raises here, before the run, when this block lacks that energy
        return integrate(lambda x: self.velocity(x, kappa), x0, dt, n_steps, method, energy)


def _kappa(kappa):
    """κ after checking it is 0 (skip-connection form) or 1 (HAM dynamics)."""
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or kappa not in KAPPAS:
        raise EnergyError(f"kappa must be 0 (skip connection) or 1 (HAM dynamics), got "
                          f"{kappa!r}")
    return int(kappa)


# ---------------------------------------------------------------- symmetry measures (M-symmetry)

def _mlp_matrices(kind, weights):
    """(W_in, W_out) of out = W_out GELU(W_in z) (:ref:`sec-parameters`): vanilla (fc1, fc2);
    sym (W, Wᵀ) with W = fc2; asym (W₁, W₁ᵀ + W₂) with W₁ = fc1, W₂ = fc2."""
    if kind == "vanilla":
        return weights["fc1.weight"], weights["fc2.weight"]
    if kind == "sym":
        return weights["fc2.weight"], weights["fc2.weight"].T
    return weights["fc1.weight"], weights["fc1.weight"].T + weights["fc2.weight"]


def _norm(a):
    """‖a‖ (Frobenius) as a Python float."""
    return float(to_numpy(xp.sqrt(xp.sum(a * a))))


def symmetry_measures(config, params):
    """Implements :eq:`M-symmetry` per block and MLP of any model, with out = W_out GELU(W_in z) (biases
    ignored):

        {prefix}.cos            = ⟨W_out, W_inᵀ⟩/(‖W_out‖‖W_in‖)  (0 if either is zero)
        {prefix}.norm_ratio     = ‖W_out‖/‖W_in‖           (∞ if W_in is zero, as below)
        {prefix}.breaking_ratio = ‖W_out − W_inᵀ‖/‖W_in‖
        {prefix}.norm_out       = ‖W_out‖

    prefix = blocks.{i}.mlp_tokens | blocks.{i}.mlp_channels. Vanilla/ParaMixer: cos(fc2, fc1ᵀ)
    and ‖fc2‖/‖fc1‖; SymMixer: cos 1, norm ratio 1, breaking ratio 0 (up to rounding);
    AsymMixer (W_out = W₁ᵀ + W₂): breaking ratio ‖W₂‖/‖W₁‖, cos and norm ratio of the map it
    applies. Returns a flat dict of Python floats (JSON-ready)."""
    if not isinstance(config, MixerConfig):
        raise TypeError(f"symmetry_measures needs a MixerConfig, got {type(config)}")
    mixer, measures = Mixer(config), {}
    check_params(mixer.param_shapes, params)
    for block in range(config.depth):
        for mlp in BRANCH_AXIS:
            w_in, w_out = _mlp_matrices(config.mlp_kind, mixer.mlp_weights(params, block, mlp))
            norm_in, norm_out = _norm(w_in), _norm(w_out)
            dot = float(to_numpy(xp.sum(w_out * w_in.T)))
            prefix = f"blocks.{block}.{mlp}"
            measures[f"{prefix}.cos"] = dot / (norm_in * norm_out) if norm_in * norm_out else 0.0
            measures[f"{prefix}.norm_ratio"] = norm_out / norm_in if norm_in else math.inf
            measures[f"{prefix}.breaking_ratio"] = (_norm(w_out - w_in.T) / norm_in
                                                    if norm_in else math.inf)
            measures[f"{prefix}.norm_out"] = norm_out
    return measures
