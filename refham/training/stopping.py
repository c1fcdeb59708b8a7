"""Stop requests: SIGINT and SIGTERM become a request that the work checks at its next step
boundary (a training step, a sweep's next run), so that it stops with its state saved.

    with stop_requests() as stop:       # nested uses share ONE request: none is ever lost
        while work_left and not stop.signal:
            do_one_step()

The handlers are installed by the outermost `stop_requests()` and put back when it ends; an inner
one (`train` inside a sweep) shares the outer request, so a signal that arrives after a run's
last step — while it evaluates, saves, or between runs — is still pending when the sweep looks.
A second signal while one is pending raises KeyboardInterrupt (outputs are written atomically:
nothing tears). Outside the main thread no handlers can be installed and no request is made.
`also_from` adds a source asked at each look: under mpiexec a sweep's ranks each train runs of
their own, and one rank's signal reaches the others through it (a note over MPI).

Exit statuses of a stopped command: 128 + the signal's number (130 for SIGINT, 143 for
SIGTERM), as a shell reports a process the signal ended.
"""
import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The pending request: `signal` is the name of the first signal received (None: none),
    here or — through a source added with `also_from` — by another process of the job."""

    def __init__(self):
        self.signal_here, self.signal_elsewhere = None, None
        self.depth, self.sources = 0, []

    @property
    def signal(self):
        """The name of the signal that asks to stop, or None; asks the sources while none has."""
        if self.signal_here is None and self.signal_elsewhere is None:
            self.signal_elsewhere = next(filter(None, (ask() for ask in self.sources)), None)
        return self.signal_here or self.signal_elsewhere

    @contextlib.contextmanager
    def also_from(self, ask):
        """While inside, `ask()` (→ a signal's name or None, cheap: it is asked at every step
        boundary) may also request the stop: another rank's signal, under mpiexec."""
        self.sources.append(ask)
        try:
            yield self
        finally:
            self.sources.remove(ask)

    def exit_status(self):
        """128 + the signal's number, the status of a command this request stopped (0: none)."""
        known = self.signal in signal.Signals.__members__
        return 128 + signal.Signals[self.signal].value if known else 1 if self.signal else 0

    def _receive(self, signum, frame):
        if self.signal_here is not None:
            raise KeyboardInterrupt
        self.signal_here = signal.Signals(signum).name


_REQUEST = StopRequest()


@contextlib.contextmanager
def stop_requests():
    """The process's StopRequest while SIGINT/SIGTERM set it (see the module docstring); the
    outermost use starts with no request pending and restores the handlers it found."""
    request = _REQUEST
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    if request.depth:
        request.depth += 1
        try:
            yield request
        finally:
            request.depth -= 1
        return
    request.signal_here, request.signal_elsewhere, request.depth = None, None, 1
    previous = {s: signal.signal(s, request._receive) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        request.depth = 0
        for s, handler in previous.items():
            signal.signal(s, handler)
