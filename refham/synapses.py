"""The synapses of a HAM: bilinear energies E_s = −⟨g_p, M_W(g_q)⟩ between two neuron layers,
with one matrix W serving both directions (so a HAM's weights are symmetric by construction).

    Dense(a, b)                   E = −⟨g_a, W g_b⟩ on flattened layers      :eq:`S-dense`
    TokenMixing(hidden, visible)  v (S, C), h (N_s, C), W ∈ R^{N_s×S}         :eq:`S-token`
    ChannelMixing(hidden, visible) v (S, C), h (S, N_c), W ∈ R^{N_c×C}        :eq:`S-channel`

Each gives its energy, its gradients in both activations (together with the energy in one pass
of two contractions), and the vector-Jacobian products that backprop through a step needs.
Activations `gs` are dicts {layer name: (B, *shape)}; refham.ham assembles synapses into a HAM.
"""
import abc
import dataclasses
import math

from refham.errors import RefhamError
from refham.backend import xp


class HAMError(RefhamError, ValueError):
    """A HAM graph, or a call on one, is invalid (unknown names, shapes, NaN states, …)."""


def batch_inner(a, b):
    """⟨a, b⟩ per sample: Σ over every axis but the leading batch axis; shape (B,)."""
    return xp.sum(xp.reshape(a * b, (a.shape[0], -1)), axis=1)


def _contract(subscripts, a, b):
    """einsum of two operands; optimize=True routes it through BLAS instead of einsum's own loops."""
    return xp.einsum(subscripts, a, b, optimize=True)


class Synapse(abc.ABC):
    """A bilinear synapse E_s = −⟨g_p, M_W(g_q)⟩ between layers p and q = `self.layers`.

    A subclass names the axes of W, g_p and g_q in `subscripts` (einsum letters, b = batch);
    then M_W(g_q) = einsum(w,q→p), its adjoint M_Wᵀ(g_p) = einsum(w,p→q), and
    ∂⟨u, M_W(v)⟩/∂W = einsum(p,q→w) give the energy, both gradients and every VJP.
    """
    subscripts = None      # (w, p, q)
    flattens = False       # True: layer axes are flattened to one before contracting (dense)

    def __post_init__(self):
        names = self.layers
        if not all(isinstance(n, str) and n for n in names):
            raise HAMError(f"{type(self).__name__} needs layer names as non-empty strings, "
                           f"got {names!r}")
        if names[0] == names[1]:
            raise HAMError(f"{type(self).__name__} connects layer {names[0]!r} to itself; a "
                           f"synapse joins two different layers (add a hidden layer instead)")

    @property
    @abc.abstractmethod
    def layers(self):
        """The connected layer names (p, q)."""

    @abc.abstractmethod
    def _weight_shape(self, p_shape, q_shape):
        """W's shape for layers of these shapes; raises HAMError if they cannot be connected."""

    def weight_shape(self, layers):
        """W's shape given {name: Layer}; raises HAMError for unknown names or unfit shapes."""
        unknown = [n for n in self.layers if n not in layers]
        if unknown:
            raise HAMError(f"{self!r} names unknown layer(s) {', '.join(map(repr, unknown))}; "
                           f"the layers are {', '.join(map(repr, layers))}")
        return self._weight_shape(*(layers[n].shape for n in self.layers))

    def _view(self, g):
        """g as the contraction sees it: (B, N) for a flattening synapse, else unchanged."""
        return xp.reshape(g, (g.shape[0], -1)) if self.flattens else g

    def _map(self, W, g_q, p_shape):
        """M_W(g_q), shaped like g_p."""
        w, p, q = self.subscripts
        return xp.reshape(_contract(f"{w},{q}->{p}", W, self._view(g_q)), p_shape)

    def _adjoint(self, W, g_p, q_shape):
        """M_Wᵀ(g_p), shaped like g_q."""
        w, p, q = self.subscripts
        return xp.reshape(_contract(f"{w},{p}->{q}", W, self._view(g_p)), q_shape)

    def _outer(self, u_p, v_q):
        """∂⟨u_p, M_W(v_q)⟩/∂W, summed over the batch; W's shape."""
        w, p, q = self.subscripts
        return _contract(f"{p},{q}->{w}", self._view(u_p), self._view(v_q))

    def synapse_energy(self, gs, W):
        """E_s = −⟨g_p, M_W(g_q)⟩ per sample, shape (B,); :eq:`S-dense`, :eq:`S-token`,
        :eq:`S-channel` for the three kinds."""
        p, q = self.layers
        return -batch_inner(gs[p], self._map(W, gs[q], gs[p].shape))

    def synapse_energy_and_signals(self, gs, W):
        """(E_s, {p: M_W(g_q), q: M_Wᵀ(g_p)}): the energy and what each layer receives, the
        gradients' negatives, from two contractions: m = M_W(g_q) gives both E_s = −⟨g_p, m⟩
        and the signal to p. A HAM subtracts the signals from its gradients (x − m, one pass,
        equal bit for bit to x + (−m))."""
        p, q = self.layers
        m = self._map(W, gs[q], gs[p].shape)
        return -batch_inner(gs[p], m), {p: m, q: self._adjoint(W, gs[p], gs[q].shape)}

    def synapse_energy_and_grad(self, gs, W):
        """(E_s, {p: ∂E_s/∂g_p = −M_W(g_q),  q: ∂E_s/∂g_q = −M_Wᵀ(g_p)}), the signals negated."""
        energy, signals = self.synapse_energy_and_signals(gs, W)
        return energy, {name: -signal for name, signal in signals.items()}

    def signal_to(self, name, gs, W, shape):
        """What layer `name` (state shape `shape`, batch axis included) receives, −∂E_s/∂g_name:
        M_W(g_q) for p, M_Wᵀ(g_p) for q; one contraction that reads only the other layer's g."""
        p, q = self.layers
        return self._map(W, gs[q], shape) if name == p else self._adjoint(W, gs[p], shape)

    def grad(self, gs, W):
        """{p: ∂E_s/∂g_p, q: ∂E_s/∂g_q}, as in `synapse_energy_and_grad` (the one definition)."""
        return self.synapse_energy_and_grad(gs, W)[1]

    def vjp(self, gs, W, cotangents):
        """VJP of (g_p, g_q, W) ↦ grad: for cotangents c_p, c_q of the two gradients,
        dW = −(∂⟨c_p, M_W g_q⟩ + ∂⟨g_p, M_W c_q⟩)/∂W,  d g_p = −M_W(c_q),  d g_q = −M_Wᵀ(c_p).
        `cotangents` needs both layers' entries (zeros for none); other entries are ignored."""
        p, q = self.layers
        missing = [n for n in (p, q) if n not in cotangents]
        if missing:
            raise HAMError(f"{self!r}.vjp needs a cotangent for layer(s) {missing} (pass zeros)")
        c_p, c_q = cotangents[p], cotangents[q]
        dW = -(self._outer(c_p, gs[q]) + self._outer(gs[p], c_q))
        return dW, {p: -self._map(W, c_q, gs[p].shape), q: -self._adjoint(W, c_p, gs[q].shape)}


@dataclasses.dataclass(frozen=True)
class Dense(Synapse):
    """E = −⟨g_a, W g_b⟩ with the layers flattened: W ∈ R^{N_a×N_b}, N = prod(layer shape).
    Implements :eq:`S-dense`."""
    a: str
    b: str
    subscripts = ("ij", "bi", "bj")
    flattens = True

    @property
    def layers(self):
        return (self.a, self.b)

    def _weight_shape(self, a_shape, b_shape):
        return (math.prod(a_shape), math.prod(b_shape))

    # M_W and M_Wᵀ as plain matrix products: the general einsum route (Synapse._map) costs
    # NumPy an extra pass over its operands here (docs/performance.md: the HAM benchmark)
    def _map(self, W, g_q, p_shape):
        """M_W(g_q) = g_q Wᵀ on the flattened layers, shaped like g_p."""
        return xp.reshape(self._view(g_q) @ W.T, p_shape)

    def _adjoint(self, W, g_p, q_shape):
        """M_Wᵀ(g_p) = g_p W on the flattened layers, shaped like g_q."""
        return xp.reshape(self._view(g_p) @ W, q_shape)


@dataclasses.dataclass(frozen=True)
class _Mixing(Synapse):
    """A hidden layer that mixes one axis of a visible (S, C) layer: it keeps the other axis
    (`kept_axis`) and replaces the mixed one by its own size N; W ∈ R^{N×(mixed size)}."""
    hidden: str
    visible: str
    kept_axis = None
    hidden_form = None  # the hidden shape for the error message, e.g. "(N_s, {C})"

    @property
    def layers(self):
        return (self.hidden, self.visible)

    def _weight_shape(self, hidden_shape, visible_shape):
        if len(visible_shape) != 2 or len(hidden_shape) != 2:
            raise HAMError(f"{self!r} needs 2-D layers, a visible (S, C) one and a hidden one; "
                           f"got visible {visible_shape} and hidden {hidden_shape}")
        kept, mixed = self.kept_axis, 1 - self.kept_axis
        if hidden_shape[kept] != visible_shape[kept]:
            S, C = visible_shape
            raise HAMError(f"{self!r}: for a visible layer of shape (S, C) = {visible_shape} the "
                           f"hidden layer must be {self.hidden_form.format(S=S, C=C)}, got "
                           f"{hidden_shape}")
        return (hidden_shape[mixed], visible_shape[mixed])


class TokenMixing(_Mixing):
    """Visible v (S, C), hidden h (N_s, C): E = −⟨g_h, W g_v⟩, W ∈ R^{N_s×S} (mixes tokens,
    the same W for every channel column). Implements :eq:`S-token`."""
    subscripts = ("ns", "bnc", "bsc")
    kept_axis, hidden_form = 1, "(N_s, C) = (N_s, {C})"


class ChannelMixing(_Mixing):
    """Visible v (S, C), hidden h (S, N_c): E = −⟨g_h, g_v Wᵀ⟩, W ∈ R^{N_c×C} (mixes channels,
    the same W for every token row). Implements :eq:`S-channel`."""
    subscripts = ("mc", "bsm", "bsc")
    kept_axis, hidden_form = 0, "(S, N_c) = ({S}, N_c)"
