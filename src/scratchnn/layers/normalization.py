"""Batch normalisation, the book's ``BatchNormalization`` with PyTorch's conventions."""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from scratchnn import _buffers, _checks, _fused
from scratchnn.backend import compute_dtype_of
from scratchnn.layers.base import Layer


class BatchNorm(Layer):
    """Batch normalisation over the batch (and, for images, the pixels) of each channel.

    Input (N, C) or (N, C, H, W); statistics are taken per channel over the
    other axes, ``m = N`` or ``N H W`` values each.

    Training: ``mu = mean(x)``, ``var = mean((x - mu)**2)`` (biased),
    ``xhat = (x - mu) / sqrt(var + eps)``, ``y = gamma xhat + beta``; and the
    running statistics move as PyTorch's do::

        running_mean <- (1 - momentum) running_mean + momentum mu
        running_var  <- (1 - momentum) running_var  + momentum var m / (m - 1)

    (the unbiased variance; the book's ``momentum=0.9`` is PyTorch's 0.1).
    Evaluation (``training = False``): ``y = gamma (x - running_mean) /
    sqrt(running_var + eps) + beta``, and nothing is updated.

    Backward, training: ``dbeta = sum(dout)``, ``dgamma = sum(dout xhat)``,
    ``dx = gamma / sqrt(var + eps) (dout - mean(dout) - xhat mean(dout xhat))``.
    Evaluation: ``dx = gamma dout / sqrt(running_var + eps)``.

    ``params`` are ``gamma`` (ones) and ``beta`` (zeros), so a ``Sequential``
    names them ``gamma1``, ``beta1`` as the book's ``MultiLayerNetExtend``;
    ``buffers`` are ``running_mean`` (zeros) and ``running_var`` (ones), saved
    by ``Sequential.state()``. All four are arrays of shape (C,) in ``dtype``;
    float16 is computed in float32; the output has the input's dtype.

    Keeps ``xhat`` and ``inv_std = 1 / sqrt(var + eps)``: the whole of dx.

    >>> bn = BatchNorm(2, dtype=np.float64)
    >>> bn
    BatchNorm(2, eps=1e-05, momentum=0.1, dtype=float64)
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> print(bn.forward(x).round(4))
    [[-1. -1.]
     [ 1.  1.]]
    >>> print(bn.running_mean, bn.running_var)
    [0.2 2. ] [ 1.1 20.9]
    >>> bn.training = False
    >>> print(bn.forward(x).round(4))
    [[0.7628 1.7499]
     [2.6697 6.1247]]
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        dtype = _checks.float_dtype("BatchNorm", dtype)
        c = _checks.count("BatchNorm", "num_features", num_features)
        self.num_features = c
        self.eps = _checks.positive("BatchNorm", "eps", eps)
        self.momentum = _checks.fraction("BatchNorm", "momentum", momentum, one=True)
        self.gamma = np.ones(c, dtype)
        self.beta = np.zeros(c, dtype)
        self.running_mean = np.zeros(c, dtype)
        self.running_var = np.ones(c, dtype)
        self.training = True
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        self.xhat: np.ndarray | None = None
        self.inv_std: np.ndarray | None = None
        self._axes: tuple[int, ...] = ()
        self._trained = True  # the mode of the last forward, which backward must follow

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The learnable arrays: ``{"gamma": gamma, "beta": beta}`` (the same objects)."""
        return {"gamma": self.gamma, "beta": self.beta}

    @property
    def grads(self) -> dict[str, np.ndarray | None]:
        """The gradients of the last backward, named like ``params``."""
        return {"gamma": self.dgamma, "beta": self.dbeta}

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        """The running statistics (not learned, but saved with the model)."""
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"dtype={self.gamma.dtype})"
        )

    def _forward(self, x: np.ndarray) -> np.ndarray:
        c = self.num_features
        if x.ndim not in (2, 4) or x.shape[1] != c:
            raise ValueError(
                f"BatchNorm: expected input of shape (batch, {c}) or (batch, {c}, H, W); "
                f"got {x.shape}"
            )
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        shape = (1, c) + (1,) * (x.ndim - 2)  # a per-channel array, broadcast against x
        work = compute_dtype_of(np.result_type(x.dtype, self.gamma.dtype))
        z = x.astype(work, copy=False)
        m = x.size // c
        if self.training:
            if m < 2:
                raise ValueError(
                    f"BatchNorm: training needs more than one value per channel; got {x.shape}"
                )
            compiled = self._compiled_forward(z)
            if compiled is not None:
                return compiled.astype(x.dtype, copy=False)
            # The sums in float64, as the compiled kernel's: float32 sums over a large
            # batch lose digits (relative error about 1e-3 at a million rows).
            mean = z.mean(axis=axes, dtype=np.float64).astype(work, copy=False)
            centred = z - mean.reshape(shape)
            subscripts = "ncxy,ncxy->c" if x.ndim == 4 else "nc,nc->c"
            var = (np.einsum(subscripts, centred, centred, dtype=np.float64) / m).astype(
                work, copy=False
            )
            inv_std = 1.0 / np.sqrt(var + self.eps)
            centred *= inv_std.reshape(shape)
            xhat = centred
            self._update_running(mean, var, m)
        else:
            inv_std = 1.0 / np.sqrt(self.running_var.astype(work) + self.eps)
            xhat = (z - self.running_mean.astype(work).reshape(shape)) * inv_std.reshape(shape)
        self._axes, self._trained = axes, self.training
        # Keeps xhat and inv_std: dgamma needs xhat, dx needs both.
        self.xhat, self.inv_std = xhat, inv_std
        out = xhat * self.gamma.astype(work).reshape(shape)
        out += self.beta.astype(work).reshape(shape)  # in place: one image-sized temporary fewer
        return out.astype(x.dtype, copy=False)

    def _update_running(self, mean: np.ndarray, var: np.ndarray, m: int) -> None:
        mo = self.momentum
        self.running_mean[...] = (1 - mo) * self.running_mean + mo * mean
        self.running_var[...] = (1 - mo) * self.running_var + mo * var * (m / (m - 1))

    def _compiled_forward(self, z: np.ndarray) -> np.ndarray | None:
        """Training forward of (N, C, H, W) images in compiled passes that stream them (the
        statistics, then xhat and the output); None where the kernels cannot take ``z``."""
        if type(z) is not np.ndarray or z.ndim != 4 or not _fused.ENABLED:
            return None
        n, c, h, w = z.shape
        stats = np.empty((c, 5), z.dtype)
        stats[:, 0], stats[:, 1] = self.gamma, self.beta
        z = np.ascontiguousarray(z)
        xhat, out = _buffers.empty_like(z), _buffers.empty_like(z)
        if not _fused.batchnorm("forward", z, xhat, out, stats, (n, c, h * w), self.eps):
            return None
        self._update_running(stats[:, 2], stats[:, 3], n * h * w)
        self._axes, self._trained = (0, 2, 3), True
        self.xhat, self.inv_std = xhat, stats[:, 4].copy()
        return out

    def _param_grads(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Set ``dgamma`` and ``dbeta``; return ``dout``, ``sum(dout)`` and ``sum(dout xhat)``.

        The sums are returned in the work dtype: dx needs them unrounded.
        """
        assert self.xhat is not None  # forward ran: the base checks it
        g = dout.astype(self.xhat.dtype, copy=False)
        sum_g = g.sum(axis=self._axes)
        sum_gx = np.einsum("ncxy,ncxy->c" if g.ndim == 4 else "nc,nc->c", g, self.xhat)
        self.dbeta = sum_g.astype(self.gamma.dtype)
        self.dgamma = sum_gx.astype(self.gamma.dtype)
        return g, sum_g, sum_gx

    def _backward_params(self, dout: np.ndarray) -> None:
        self._param_grads(dout)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        xhat = self.xhat
        if self._trained and type(xhat) is np.ndarray and xhat.ndim == 4 and _fused.ENABLED:
            # Compiled passes over the images: both sums (dbeta, dgamma), then dx.
            g = np.ascontiguousarray(dout, dtype=xhat.dtype)
            stats = np.empty((self.num_features, 5), g.dtype)
            stats[:, 0], stats[:, 4] = self.gamma, self.inv_std
            n, c, h, w = g.shape
            dx = _buffers.empty_like(g)
            if _fused.batchnorm("backward", g, xhat, dx, stats, (n, c, h * w), self.eps):
                self.dbeta = stats[:, 2].astype(self.gamma.dtype)
                self.dgamma = stats[:, 3].astype(self.gamma.dtype)
                return dx
        g, sum_g, sum_gx = self._param_grads(dout)
        assert self.xhat is not None and self.inv_std is not None
        c = self.num_features
        shape = (1, c) + (1,) * (g.ndim - 2)
        scale = (self.gamma.astype(g.dtype) * self.inv_std).reshape(shape)
        if not self._trained:
            return g * scale
        m = g.size // c
        dx = self.xhat * (sum_gx.reshape(shape) / m)
        np.subtract(g, dx, out=dx)
        dx -= sum_g.reshape(shape) / m
        dx *= scale
        return dx
