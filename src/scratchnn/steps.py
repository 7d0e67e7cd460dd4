"""The training step as ``fit`` takes it: eager, or on a GPU replayed from a CUDA graph.

A step is the network's gradient on a batch and the optimiser's update. On
the CPU, and wherever a graph cannot hold the step, it runs as written
(:meth:`Sequential.gradient <scratchnn.models.Sequential.gradient>`, then
``optimizer.update``). On a GPU a small network's step is bound by the host:
the 784-1024-1024-10 network's step makes 25 device calls, each a few
microseconds of Python on the host, where the card's work takes a few
hundred (docs/benchmarks.md, "On a GPU"). So where the step launches the
same work at every batch, :class:`TrainingStep` records it once into a CUDA
graph and replays it: the batch is copied into the arrays the graph reads
(fit's batches gathered there from the data, :meth:`TrainingStep.on_rows`),
the graph is launched (one call), and the step's loss is copied out, left on
the GPU unread as fit leaves it.

The first batch of each ``TrainingStep`` (fit makes one per epoch, after its
learning rate is set) steps eagerly, on the stream the step will be captured
on and with the products the capture makes: cuBLAS's library called on a
handle of scratchnn's own (:func:`scratchnn.kernels.products.capturing`;
CuPy's own cuBLAS calls refuse a capture), so that whatever they load or
choose is loaded and chosen before the capture, and the graph computes as the
eager step did. The next batch of the same shape is captured (a capture runs
nothing) and replayed at once, so that what the network holds afterwards is
always a step that ran. The graph's arrays come from a memory pool of the
network's own, which no array made outside a graph is handed, and it is
captured on a stream of the network's own, both alive while the network or
one of its layers is (see :class:`_Memory`). A batch of another shape (the
last, shorter one) steps eagerly.

The step is replayed only where everything it does is the same at every
batch; otherwise it runs eagerly and :attr:`TrainingStep.refusal` says why:

- the batch is a float32 or float64 CuPy matrix, the labels class indices
  that the loss's kernel takes (up to 1,024 classes), every parameter of the
  batch's dtype, and CuPy can capture graphs;
- the network is a :class:`~scratchnn.models.Sequential` of layers whose work
  depends on the shapes alone (:data:`REPLAYABLE_LAYERS`, each its own
  class's, with no hook on its forward or backward), ending in
  :class:`~scratchnn.layers.losses.SoftmaxWithLoss`; not Dropout (a new mask
  at each step) nor BatchNorm;
- the optimiser is one of :data:`REPLAYABLE_OPTIMIZERS` (SGD, Momentum,
  Nesterov, AdaGrad, RMSprop, Adam, each its own class's, with no hook on its
  update), whose kernels hold their hyperparameters as they were at the capture
  (a learning rate set between steps is taken by eager steps; fit sets its
  rate before each epoch's new ``TrainingStep``). Adam's two scalars that
  change at every step (its bias corrections, folded) are worked out on the
  host as the eager step works them out, a table of the next 1,024 steps at a
  time, which the graph reads row by row (:class:`_StepScalars`); its
  parameters must all have taken the same number of steps, and its learning
  rate be above 1e-30 (below, the folded scalars may overflow and the step is
  taken unfolded).

One handle serves a device, from one thread: two graphs replayed at once on
two streams would share its workspace (and an Adam being captured reads its
scalars from the GPU: one thread steps it). ``TrainingStep.use_graphs = False``
turns the replays off. A capture that fails (an exception of CuPy's, CUDA's or
cuBLAS's) is said once as a ``RuntimeWarning`` and the steps go on eagerly,
the batch it was for included.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from scratchnn import layers, optim
from scratchnn.backend import FLOAT_DTYPES, cupy_array_type
from scratchnn.kernels import _kernels_take, cuda, products
from scratchnn.layers.losses import DeviceLoss, Loss, SoftmaxWithLoss
from scratchnn.models import Sequential, _runs_as_written

# The layers whose step on the GPU launches the same kernels whatever the batch holds.
REPLAYABLE_LAYERS = frozenset({
    layers.Affine, layers.Relu, layers.Sigmoid, layers.Tanh, layers.LeakyRelu, layers.Elu,
    layers.Gelu, layers.Softplus, layers.Silu, layers.Identity,
})  # fmt: skip
# The optimisers whose GPU step is one kernel, its state updated in place; its scalars fixed
# (Adam's bias corrections read from a table on the GPU: _StepScalars).
REPLAYABLE_OPTIMIZERS = frozenset({
    optim.SGD, optim.Momentum, optim.Nesterov, optim.AdaGrad, optim.RMSprop, optim.Adam,
})  # fmt: skip


class TrainingStep:
    """``step(x, t)``: one training step of ``network`` by ``optimizer`` on the batch
    ``x``, ``t``; returns its loss, on the GPU left unread (a
    :class:`~scratchnn.layers.losses.DeviceLoss`), as ``network._gradient(x, t,
    wait=False)`` leaves it. The labels must have been checked (as fit checks every
    label before its first step): a replay checks nothing.

    >>> import numpy as np
    >>> from scratchnn import mlp
    >>> from scratchnn.optim import SGD
    >>> net = mlp([4, 3, 2], rng=np.random.default_rng(0))
    >>> step = TrainingStep(net, SGD(lr=0.1))
    >>> loss = step(np.ones((5, 4)), np.array([0, 1, 0, 1, 1]))
    >>> round(float(loss), 4) == round(net.last_loss, 4), step.refusal
    (True, 'the batch is not on a GPU')
    """

    # Whether steps on a GPU are replayed from a CUDA graph where they can be.
    use_graphs: ClassVar[bool] = True

    def __init__(self, network: Any, optimizer: Any) -> None:
        self.network, self.optimizer = network, optimizer
        # Why the steps run eagerly (None while none has run, or where they replay).
        self.refusal: str | None = None
        self._memory: _Memory | None = None  # the network's pool and stream, once warmed up
        self._warmed: tuple[Any, Any] | None = None  # the warm-up batch (for its shapes)
        self._replay: _Replay | None = None
        self._scalars: _StepScalars | None = None  # Adam's bias corrections, for its graph
        self._decided = False

    def __call__(self, x: Any, t: Any) -> float | DeviceLoss:
        replay = self._replay
        if replay is not None:
            return replay(x, t) if replay.takes(x, t) else self._eager(x, t)
        if not self._decided:
            self._decided = True
            self.refusal = self._refusal(x, t)
            if self.refusal is None:
                return self._warm_up(x, t)
        elif self._warmed is not None and _Replay.alike(self._warmed, x, t):
            self._replay = self._capture(x, t)
            if self._replay is not None:
                return self._replay(x, t)
        return self._eager(x, t)

    def on_rows(self, x: Any, t: Any, rows: Any) -> float | DeviceLoss:
        """The step on the batch ``x[rows]``, ``t[rows]`` (fit's: ``rows`` from
        :func:`~scratchnn.data.minibatch_rows`). A replay gathers the rows straight into
        the arrays its graph reads: two device calls where indexing the batch out and
        copying it in make four, and no allocation. The labels must have been checked (as
        fit checks them): should one be out of range, the loss's message would speak of
        all of ``t``, not of the batch's."""
        replay = self._replay
        if replay is not None and replay.takes_rows(x, t, rows):
            return replay.gathered(x, t, rows)
        return self(x[rows], t[rows])

    def _eager(
        self, x: Any, t: Any, scalars: _StepScalars | None = None
    ) -> float | DeviceLoss:
        """The step as written; with ``scalars`` (the warm-up of Adam's), its bias
        corrections are read from the table on the GPU, as the replays will read them."""
        network = self.network
        grads = network._gradient(x, t, wait=False)  # (first: a layer may make its
        if scalars is None:  # parameters at its first forward)
            self.optimizer.update(network.params, grads)
        else:
            scalars.take_row()
            scalars.update(grads)
            scalars.count()
        loss: float | DeviceLoss = network._last_loss
        return loss

    def _warm_up(self, x: Any, t: Any) -> float | DeviceLoss:
        """The first step, eager, on the stream the next will be captured on and with the
        products the capture makes (cuBLAS's library on scratchnn's handle): what they load
        and choose is then loaded and chosen before the capture, and the graph's numbers
        are the eager step's. Where the loss's kernel did not take the scores (it alone
        leaves its loss on the GPU), no capture follows."""
        cupy = sys.modules["cupy"]
        self._memory = memory = _memory_of(self.network, cupy)
        if memory.failure is not None:  # (said once, when the network's capture failed)
            self.refusal = memory.failure
            return self._eager(x, t)
        stream = memory.stream
        if type(self.optimizer) is optim.Adam:
            self._scalars = _StepScalars(cupy, self.optimizer, self.network, x.dtype)
        cupy.cuda.get_current_stream().synchronize()  # the batch and parameters are ready
        try:
            with products.capturing(stream), stream:
                loss = self._eager(x, t, self._scalars)
        except BaseException as error:  # (a step of its own fails on the current stream too)
            with contextlib.suppress(Exception):  # what it queued ends before the step
                stream.synchronize()
            if not isinstance(error, Exception):
                raise  # (Ctrl-C)
            self._failed(error)
            return self._eager(x, t)
        stream.synchronize()  # its results are ready for the current stream
        if type(loss) is not DeviceLoss:
            self.refusal = "the loss's kernel does not take these scores"
        else:
            self._warmed = (x, t)
        return loss

    def _failed(self, error: Exception) -> None:
        """Steps from now on eager, for this network's later steps too (fit's later
        epochs), the reason said once."""
        self._warmed = None
        self.refusal = f"the capture failed: {type(error).__name__}: {error}"
        if self._memory is not None:
            self._memory.failure = self.refusal
        warnings.warn(f"TrainingStep: {self.refusal}; the steps run eagerly", RuntimeWarning,
                      stacklevel=4)  # fmt: skip

    def _refusal(self, x: Any, t: Any) -> str | None:
        """Why the step on ``x``, ``t`` cannot be replayed from a graph; None if it can."""
        network, optimizer = self.network, self.optimizer
        if not self.use_graphs:
            return "TrainingStep.use_graphs is False"
        if type(x) is not cupy_array_type():
            return "the batch is not on a GPU"
        cupy = sys.modules["cupy"]
        if not hasattr(getattr(cupy.cuda, "Stream", None), "begin_capture"):
            return "this CuPy captures no graphs"
        if x.ndim != 2 or x.dtype not in FLOAT_DTYPES or not _kernels_take(cupy, x.dtype):
            return f"the batch is not a float32 or float64 matrix ({x.dtype}, {x.ndim}-d)"
        if t.ndim != 1 or t.dtype.kind not in "iu":
            return "the labels are not class indices"
        if not (type(network) is Sequential and network.training):
            return "the network is not a Sequential in training mode"
        for i, layer in enumerate(network.layers):
            if type(layer) not in REPLAYABLE_LAYERS or not _runs_as_written(layer):
                return f"layer {i} ({type(layer).__name__}) is not one whose work is replayed"
        loss = network.last_layer
        if type(loss) is not SoftmaxWithLoss or not _runs_as_written(loss, Loss):
            return f"the loss ({type(loss).__name__}) is not SoftmaxWithLoss as written"
        if type(optimizer) not in REPLAYABLE_OPTIMIZERS or "update" in vars(optimizer):
            return f"the optimiser ({optimizer!r}) is not one whose step is replayed as written"
        if any(type(p) is not type(x) or p.dtype != x.dtype for p in network.params.values()):
            return "a parameter is not on the GPU in the batch's dtype"
        if type(optimizer) is optim.Adam:
            return _StepScalars.refusal(optimizer, network.params)
        return None

    def _capture(self, x: Any, t: Any) -> _Replay | None:
        """The step captured into a CUDA graph for batches shaped as ``x``, ``t`` (nothing
        runs: a capture records); None, with a warning, where it fails."""
        cupy, memory = sys.modules["cupy"], self._memory
        assert memory is not None  # (set by the warm-up, which a capture follows)
        network, optimizer, stream = self.network, self.optimizer, memory.stream
        x_in, t_in = cupy.empty_like(x), cupy.empty_like(t)
        scalars = self._scalars
        # What the capture sets (the layers' arrays, the last loss) is what no step has
        # computed until the graph is launched: put back if the capture stops.
        held = [(holder, dict(vars(holder))) for holder in (network, *network.layers,
                                                              network.last_layer)]  # fmt: skip
        try:
            with products.capturing(stream), cupy.cuda.using_allocator(memory.pool.malloc):
                with stream:
                    stream.begin_capture()
                    try:
                        grads = network._gradient(x_in, t_in, wait=False)
                        if scalars is None:
                            optimizer.update(network.params, grads)
                        else:  # (no row taken, no step counted: a capture runs nothing)
                            scalars.update(grads)
                    except BaseException:
                        with contextlib.suppress(Exception):  # the step's error is the one
                            stream.end_capture()
                        raise
                    graph = stream.end_capture()
        except BaseException as error:
            for holder, state in held:
                attributes = vars(holder)
                attributes.update(state)  # (then the capture's own: a layer never lacks W)
                for name in attributes.keys() - state.keys():
                    del attributes[name]
            if not isinstance(error, Exception):
                raise  # (Ctrl-C: the step as it was before the capture)
            self._failed(error)
            return None
        for holder, _ in held[1:]:  # a layer kept from a dropped network keeps the pool
            _memory_held[holder] = memory
        return _Replay(network, optimizer, graph, x_in, t_in, network._last_loss, scalars)


@dataclass
class _Memory:
    """A network's memory pool for its graphs' arrays, and the stream they are captured on.

    One pool, alive while the network or one of its layers is: the layers keep arrays a
    graph made after the graph is gone (a CuPy before 14 frees a pool's blocks with the
    pool), and no array made outside a graph is handed a block that one writes. A later
    capture takes the blocks an earlier graph left: each graph writes what it reads
    before reading it, so graphs of one network replayed in turn do not disturb each
    other's steps. One stream: CuPy's pool hands a freed block only to an allocation on
    the stream it was allocated on, so each epoch's capture on a new stream would strand
    the last one's blocks. The pool keeps one graph's working memory while the network
    lives. ``failure``: why the network's capture failed, if it did (not tried again).
    """

    pool: Any
    stream: Any
    failure: str | None = None


_memories: weakref.WeakKeyDictionary[Any, _Memory] = weakref.WeakKeyDictionary()
_memory_held: weakref.WeakKeyDictionary[Any, _Memory] = weakref.WeakKeyDictionary()


def _memory_of(network: Any, cupy: Any) -> _Memory:
    memory = _memories.get(network)
    if memory is None:
        memory = _memories[network] = _Memory(
            cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
        )
    return memory


class _Replay:
    """A captured step: copies a batch into ``x``, ``t``, launches ``graph`` and returns a
    copy of its loss (each replay writes the same arrays); ``scalars``: Adam's table of
    bias corrections, which the graph reads row by row."""

    def __init__(
        self, network: Any, optimizer: Any, graph: Any, x: Any, t: Any, loss: DeviceLoss,
        scalars: _StepScalars | None,
    ) -> None:  # fmt: skip
        self.network, self.graph, self.x, self.t, self.loss = network, graph, x, t, loss
        self.scalars = scalars
        self.copyto, self.take = sys.modules["cupy"].copyto, sys.modules["cupy"].take
        self.optimizer = optimizer
        self.settings = optimizer.hyperparameters()  # as the graph's kernels hold them

    def takes(self, x: Any, t: Any) -> bool:
        """Whether ``x``, ``t`` are a batch the graph was captured for, and the optimiser's
        hyperparameters those it was captured with (a rate set between steps is taken by
        an eager step)."""
        return self.alike((self.x, self.t), x, t) and self._as_captured()

    def _as_captured(self) -> bool:
        """Whether the optimiser's hyperparameters are those the graph's kernels hold."""
        return self.optimizer.hyperparameters() == self.settings

    @staticmethod
    def alike(batch: tuple[Any, Any], x: Any, t: Any) -> bool:
        """Whether ``x``, ``t`` have the array types, shapes and dtypes of ``batch`` (a copy
        into a graph's arrays would cast another dtype)."""
        mine, labels = batch
        return (
            type(x) is type(mine) and x.shape == mine.shape and x.dtype == mine.dtype
            and type(t) is type(labels) and t.shape == labels.shape and t.dtype == labels.dtype
        )  # fmt: skip

    def takes_rows(self, x: Any, t: Any, rows: Any) -> bool:
        """Whether ``x[rows]``, ``t[rows]`` are a batch the graph was captured for (``rows``
        an integer array of the batch's length), and the optimiser's hyperparameters
        those it was captured with."""
        mine, labels = self.x, self.t
        return (
            type(rows) is type(mine) and rows.ndim == 1 and rows.dtype.kind in "iu"
            and len(rows) == len(mine)
            and type(x) is type(mine) and x.dtype == mine.dtype and x.shape[1:] == mine.shape[1:]
            and type(t) is type(labels) and t.dtype == labels.dtype
            and t.shape[1:] == labels.shape[1:] and self._as_captured()
        )  # fmt: skip

    def gathered(self, x: Any, t: Any, rows: Any) -> DeviceLoss:
        """The step on ``x[rows]``, ``t[rows]``, gathered into the graph's arrays; the loss
        keeps ``t`` for the message should a label be out of range (fit checked them)."""
        take = self.take
        take(x, rows, axis=0, out=self.x)
        take(t, rows, axis=0, out=self.t)
        return self._launch(t)

    def __call__(self, x: Any, t: Any) -> DeviceLoss:
        copyto = self.copyto
        copyto(self.x, x)
        copyto(self.t, t)
        return self._launch(t)

    def _launch(self, t: Any) -> DeviceLoss:
        scalars = self.scalars
        if scalars is not None:
            scalars.take_row()
        self.graph.launch()  # on the current stream, after the copies
        if scalars is not None:
            scalars.count()
        captured = self.loss
        loss = DeviceLoss(captured.result.copy(), captured.rows, t, captured.classes, captured.who)
        self.network._last_loss = loss
        return loss


_STEPS_APART = "Adam's parameters have not all taken the same number of steps"


class _StepScalars:
    """Adam's two folded scalars that change at every step (``inv_scale`` and
    ``eps_scaled``: its bias corrections, see ``Adam._folded_scalars``), for a graph that
    replays its step.

    The host works them out as the eager step does, for :attr:`ROWS` steps at a
    time, into ``table`` on the GPU. Adam's update in the graph begins with a
    one-thread kernel (:func:`~scratchnn.kernels.cuda.next_row`) that copies the
    table's row ``index`` into ``row`` and counts it, and Adam's kernels read their
    two scalars from ``row`` (:class:`~scratchnn.kernels.cuda.DeviceScalar`). So each
    replay takes its own step's numbers, bit for bit the eager step's, with no copy
    from the host but one every ``ROWS`` steps. Before each replay the host checks
    which step comes next (``Adam.steps``: an eager step between replays, the last
    short batch's, moves it on) and writes the table anew if its next row is not
    that step's; after it, counts the step as the eager step counts it. The warm-up
    step reads its scalars the same way, so that every kernel the capture records
    has run (and been loaded) before it.
    """

    ROWS: ClassVar[int] = 1024

    def __init__(self, cupy: Any, optimizer: optim.Adam, network: Any, dtype: Any) -> None:
        self.cupy, self.optimizer, self.network, self.dtype = cupy, optimizer, network, dtype
        self.table = cupy.empty((self.ROWS, 2), dtype=dtype)
        self.row = cupy.empty(2, dtype=dtype)
        self.index = cupy.zeros(1, dtype=np.int64)
        self.rows_left = 0  # rows of the table that no step has read
        # The parameters' names, read at the first step (after a layer made its own): a
        # replayed network's do not change, and network.params is a new dict at each call.
        self.keys: list[str] = []
        self.next_step = 0  # the step whose scalars the table's next row holds
        # The table as last written, kept until the next write: where CuPy maps host
        # memory (CUPY_ENABLE_UMP), the copy to the table reads it later.
        self.written: np.ndarray | None = None
        # (the step's scalars as Adam's kernels take them: read from `row` as they run)
        self.on_device = {"inv_scale": cuda.DeviceScalar(self.row[0:1]),
                          "eps_scaled": cuda.DeviceScalar(self.row[1:2])}  # fmt: skip

    @staticmethod
    def refusal(optimizer: optim.Adam, params: dict[str, Any]) -> str | None:
        """Why Adam's step on ``params`` cannot be replayed; None if it can."""
        if not params:
            return "the network has no parameters for Adam to count its steps by"
        if not optimizer.lr > 1e-30:
            return f"Adam's learning rate {optimizer.lr!r} is not above 1e-30 (steps unfolded)"
        if len({optimizer.steps.get(key, 0) for key in params}) > 1:
            return _STEPS_APART
        return None

    def take_row(self) -> None:
        """Before a step that reads a row (the warm-up, a replay): the table written anew,
        from the coming step on, where its next row is not that step's or none is left
        (queued on the current stream, after the steps that read the last rows)."""
        steps = self.optimizer.steps
        if not self.keys:
            self.keys = list(self.network.params)
        counts = {steps.get(key, 0) for key in self.keys}
        if len(counts) != 1:
            raise RuntimeError(_STEPS_APART)  # (refused before the warm-up: a guard)
        coming = counts.pop() + 1
        if self.rows_left == 0 or coming != self.next_step:
            adam, cupy = self.optimizer, self.cupy
            rows = [adam._folded_scalars(coming + r)[4:] for r in range(self.ROWS)]
            self.written = np.array(rows, dtype=self.dtype)
            cupy.copyto(self.table, cupy.asarray(self.written))
            self.index.fill(0)
            self.rows_left = self.ROWS
        self.rows_left -= 1
        self.next_step = coming + 1

    def update(self, grads: dict[str, Any]) -> None:
        """Adam's update with its scalars read from ``row``, after ``next_row`` has copied
        the table's next row there. The step counts are put back afterwards: the host
        counts a step (:meth:`count`) once it has been taken, and a capture takes none."""
        adam = self.optimizer
        counts = dict(adam.steps)
        adam._scalars_on_device = self.on_device
        try:
            cuda.next_row(self.cupy, self.table, self.row, self.index)
            adam.update(self.network.params, grads)
        finally:
            adam._scalars_on_device = None
            adam.steps.clear()
            adam.steps.update(counts)

    def count(self) -> None:
        """After a step that read a row: its step counted, as the eager step counts it."""
        steps, step = self.optimizer.steps, self.next_step - 1
        for key in self.keys:
            steps[key] = step
