"""Energy descent in the paper's three-layer HAM (refham docs: metaformer; arXiv 2406.12220 Fig.
2c).

Three neuron layers s — v — c: v holds a D = 784 "image" with the layernorm Lagrangian (its
activation g_v is LayerNorm(x_v)), s and c hold N_h = 900 relu units each, and two dense synapses
join them with energies −⟨g_s, W_sv g_v⟩ and −⟨g_v, W_vc g_c⟩. Every state starts at 10·N(0,1),
the weights at 0.02·N(0,1), and 28 steps of x_A ← x_A − α ∂E/∂g_A (α = 0.5) follow. Because one
matrix serves both directions of each synapse, the energy E goes down step after step — for
steps this small: HAM.descent_step_bound gives the proven bound, and examples/step_sizes.py
shows E rising in a share of the steps from α = 1 on.

In the library's terms (this is what `refham descend` runs, see refham/cli/commands.py):

    from refham.metaformer import three_layer_ham
    ham = three_layer_ham(784, 900)                        # layers "s", "v", "c"
    weights = ham.init_weights(seed=0, scale=0.02)         # {"sv": (900, 784), "vc": (784, 900)}
    states = ham.init_states(batch=1, seed=1, scale=10.0)  # {"s": (1, 900), "v": (1, 784), …}
    trajectory = ham.descend(states, weights, alpha=0.5, max_steps=28)
    trajectory.energies                                    # (29, 1): E before and after each step

Run it:   python examples/energy_descent.py [--steps 28] [--alpha 0.5] [--out energy_descent.png]
It prints E per step and, if matplotlib is installed, saves the plot (it says so if not).
"""
import sys

from refham.cli import main as refham_main


def main(argv=None):
    """`refham descend` with these arguments (see `--help`)."""
    return refham_main(["descend", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
