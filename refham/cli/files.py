"""The file commands of `refham`: `oracle` (write and check golden files), `export` and
`import` (timm state dicts). Each is a pair `add_<name>(parser)` / `run_<name>(args)`, as in
refham.cli.commands, which lists them; bad input raises the library's errors, which
refham.cli.commands.main turns into one line and exit status 2. Every output refuses to replace an existing file without
--force (refham.files.outputs)."""

FORCE_HELP = "replace OUT if it exists (never a refham training checkpoint)"


def add_oracle(p):
    from refham.mixer import MODELS, NORMS, SIZES
    from refham.oracle.golden import HAMS, ham_golden, mixer_golden, setting_defaults

    sub = p.add_subparsers(dest="oracle_command", metavar="SUBCOMMAND")
    sub.required = True
    w = sub.add_parser("write", help="write a float64 golden file (.npz, keys by tensor name)",
                       description="Write a float64 golden file of a Mixer (--model) or of the "
                                   "Energy MetaFormer's HAM (--ham); see refham/oracle/golden.py.")
    which = w.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=MODELS, help="a Mixer golden file")
    which.add_argument("--ham", choices=HAMS, help="a HAM golden file")
    mixer, ham = setting_defaults(mixer_golden), setting_defaults(ham_golden)
    options = [  # (flag, type, choices, help); defaults None: given ones are checked and passed
        ("--size", str, tuple(SIZES), f"Mixer size ({mixer['size']})"),
        ("--n-iter", int, None, f"iterations per block ({mixer['n_iter']})"),
        ("--norm", str, NORMS, f"block norm ({mixer['norm']})"),
        ("--lam", float, None, f"AsymMixer penalty λ ({mixer['lam']})"),
        ("--label-smoothing", float, None, f"label smoothing ({mixer['label_smoothing']})"),
        ("--steps", int, None, f"AdamW steps on the batch for train/… ({mixer['steps']})"),
        ("--lr", float, None, f"AdamW learning rate, constant ({mixer['lr']})"),
        ("--weight-decay", float, None, f"AdamW weight decay ({mixer['weight_decay']})"),
        ("--perturb", float, None, f"params = init + s·N(0,1) ({mixer['perturb']})"),
        ("--visible", int, None, f"HAM: D, the visible layer's size ({ham['visible']})"),
        ("--hidden", int, None, f"HAM: N_h, units per hidden layer ({ham['hidden']})"),
        ("--alpha", float, None, f"HAM: step size of the descent step ({ham['alpha']})"),
        ("--state-scale", float, None, f"HAM: states s·N(0,1) ({ham['state_scale']})"),
        ("--weight-scale", float, None, f"HAM: weights s·N(0,1) ({ham['weight_scale']})"),
        ("--batch", int, None, f"batch size ({mixer['batch']})"),
        ("--seed", int, None, f"seed ({mixer['seed']})"),
    ]
    for flag, kind, choices, help_text in options:
        w.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)
    w.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="further Mixer config fields, e.g. depth=2 dim=6 bias=true")
    w.add_argument("--out", required=True, help="the golden .npz to write")
    w.add_argument("--force", action="store_true", help=FORCE_HELP)
    c = sub.add_parser("check", help="compare a candidate .npz with a golden file, by name",
                       description="Compare CANDIDATE with GOLDEN tensor by tensor (see "
                                   "refham/oracle/check.py); exit 0 only if all pass.")
    c.add_argument("golden")
    c.add_argument("candidate")
    c.add_argument("--rtol", type=float, default=None, help="rtol for every tensor")
    c.add_argument("--atol", type=float, default=None, help="atol for every tensor")
    c.add_argument("--tol", action="append", default=[], metavar="PATTERN=RTOL,ATOL",
                   help="tolerance for the names matching PATTERN (e.g. 'grad/*=1e-6,1e-9'); "
                        "repeatable, the last match wins")


def run_oracle(args):
    """`oracle write`: a golden file; `oracle check`: a candidate against one."""
    from refham.oracle.interop import config_overrides
    from refham.oracle.golden import (
        GoldenError, ham_golden, mixer_golden, read_meta, setting_defaults, write_golden)
    from refham.oracle.check import check
    from refham.files.outputs import check_output_file

    if args.oracle_command == "check":
        report = check(args.golden, args.candidate, args.rtol, args.atol, args.tol)
        print(report)
        return 0 if report.ok else 1
    check_output_file(args.out, args.force)  # before minutes of computing, not after
    settings = setting_defaults(mixer_golden if args.model else ham_golden)
    given = {k: v for k, v in vars(args).items() if v is not None and k in
             {**setting_defaults(mixer_golden), **setting_defaults(ham_golden)}}
    wrong = sorted(k for k in given if k not in settings)
    wrong += ["set"] if args.set and args.ham else []
    overrides = config_overrides(args.set)
    wrong += sorted(set(overrides) & set(given))
    if wrong:
        raise GoldenError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in wrong)}"
                          f" do not apply to a {'Mixer' if args.model else 'HAM'} golden "
                          f"file, or are given twice")
    if args.model:
        tensors = mixer_golden(args.model, **given, **overrides)
    else:
        tensors = ham_golden(args.ham, **given)
    write_golden(args.out, tensors, force=args.force)
    print(f"wrote {args.out}: {len(tensors) - 1} float64 tensors of {args.model or args.ham}, "
          f"settings {read_meta(tensors)['settings']}")
    return 0


def add_export(p):
    from refham.oracle.interop import FORMATS

    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a refham checkpoint, params .npz or Mixer golden file")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (needs the `safetensors` extra) or npz (safetensors)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def run_export(args):
    """Mixer weights → a timm state dict (timm names, PyTorch layouts)."""
    from refham.oracle.interop import export_weights

    config = export_weights(args.checkpoint, args.out, args.format, force=args.force)
    print(f"wrote {args.out}: the {config.model} weights as a timm state dict ({args.format}); "
          f"load with model.load_state_dict(..., strict=True)")
    return 0


def add_import(p):
    from refham.oracle.interop import IMPORT_AS
    from refham.mixer import MODELS, SIZES

    p.add_argument("file", help="a timm state dict: .npz or .safetensors")
    p.add_argument("--out", required=True, help="the refham file to write")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--as", dest="as_", choices=IMPORT_AS, default="params",
                   help="a params .npz or a refham checkpoint (params)")
    p.add_argument("--model", choices=MODELS,
                   help="the model, unless the file carries refham's metadata")
    p.add_argument("--size", choices=tuple(SIZES), default="digits",
                   help="with --model: its size (digits)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="with --model: further config fields, e.g. num_classes=100 n_iter=2")


def run_import(args):
    """A timm state dict → refham params (names, shapes and finiteness checked)."""
    from refham.oracle.interop import InteropError, config_overrides, import_weights

    if args.set and not args.model:
        raise InteropError("--set needs --model (it modifies that model's config)")
    config = (args.model, args.size, config_overrides(args.set)) if args.model else None
    config = import_weights(args.file, args.out, config, args.as_, force=args.force)
    print(f"wrote {args.out}: {config.model} weights as a refham {args.as_} file")
    return 0
