"""torch.optim.AdamW (single-tensor, float32) and torch.nn.utils.clip_grad_norm_ in numpy, in place.

All adapters, their gradients and both moments live in ONE flat float32 buffer each; per-tensor arrays are
views into them (the ONNX Runtime sessions read parameters from and write gradients into those views), so an
optimizer step is a handful of vectorized numpy calls per piece of PIECE floats, with no allocation. The
gradients, two piece-sized temporaries and the rollback backup live in a `Scratch` that several optimizers may
share (a Model's streams, whose rounds take turns).
Math, as torch 2.x `_single_tensor_adamw` with amsgrad=False, maximize=False, capturable=False:
    p *= 1 - lr*wd;  m.lerp_(g, 1-b1);  v = v*b2 + (1-b2)*g*g
    step_size = lr / (1 - b1**t);  denom = sqrt(v) / sqrt(1 - b2**t) + eps;  p -= step_size * m / denom
clip_grad_norm_(max_norm): total = ||(||g_i||)_i||_2; g *= min(1, max_norm / (total + 1e-6)).
"""
from __future__ import annotations

import math

import numpy as np

# floats per piece of an optimizer step: the temporaries are this big instead of two more copies of every
# adapter (2 x 19.6 MB for SmolLM2's default slice); 4 MB pieces keep numpy's vectorized speed
PIECE = 1 << 20


class Scratch:
    """The buffers an optimizer needs only while a round runs: gradients, two temporaries, the rollback
    backup of params and moments. A Model shares one Scratch among all its streams (their rounds take turns
    under `lock`), so a stream keeps only its params and moments between rounds."""

    def __init__(self, size: int):
        import threading
        self.size = size
        self.grads = np.zeros(size, np.float32)
        self.t1 = np.empty(min(size, PIECE), np.float32)
        self.t2 = np.empty(min(size, PIECE), np.float32)
        self.backup = (np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32))
        self.lock = threading.RLock()


class FlatAdamW:
    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, scratch: Scratch | None = None):
        self.names = [n for n, _ in specs]
        self.shapes = {n: tuple(s) for n, s in specs}
        sizes = [int(np.prod(s)) for _, s in specs]
        self.offsets = np.cumsum([0] + sizes)
        total = int(self.offsets[-1])
        self.size = total
        self.params = np.zeros(total, np.float32)
        self.exp_avg = np.zeros(total, np.float32)
        self.exp_avg_sq = np.zeros(total, np.float32)
        self.step = 0
        if scratch is None:
            scratch = Scratch(total)
        elif scratch.size != total:
            raise ValueError(f"scratch of {scratch.size} floats for {total} parameters")
        self.scratch = scratch
        self.grads = scratch.grads
        self._t1, self._t2 = scratch.t1, scratch.t2
        self._backup: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._backup_step = 0
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[n])
                for i, n in enumerate(self.names)}

    # ------------------------------------------------------------------ clipping
    def grad_norm(self) -> float:
        """torch's total norm: the 2-norm of the per-tensor 2-norms (float32 per tensor, like torch)."""
        g = self.grads
        norms = np.empty(len(self.names), np.float32)
        for i in range(len(self.names)):
            s = g[self.offsets[i]:self.offsets[i + 1]]
            norms[i] = math.sqrt(float(np.dot(s, s)))
        return float(np.sqrt(np.dot(norms, norms)))

    def clip(self, max_norm: float) -> float:
        total = self.grad_norm()
        coef = np.float32(max_norm) / np.float32(total + 1e-6)
        coef = min(coef, np.float32(1.0))
        self.grads *= coef
        return total

    def grads_finite(self) -> bool:
        # max/min propagate NaN and reach +-inf: no temporary array
        return bool(np.isfinite(self.grads.max()) and np.isfinite(self.grads.min()))

    # ------------------------------------------------------------------ step / rollback
    def save_backup(self) -> None:
        if self._backup is None:
            self._backup = self.scratch.backup
        for dst, src in zip(self._backup, (self.params, self.exp_avg, self.exp_avg_sq)):
            np.copyto(dst, src)
        self._backup_step = self.step

    def restore_backup(self) -> None:
        assert self._backup is not None
        for dst, src in zip((self.params, self.exp_avg, self.exp_avg_sq), self._backup):
            np.copyto(dst, src)
        self.step = self._backup_step

    def release_backup(self) -> None:
        self._backup = None

    def apply(self) -> None:
        self.step += 1
        for a in range(0, self.size, PIECE):
            self._apply(slice(a, min(self.size, a + PIECE)))

    def _apply(self, part: slice) -> None:
        """The step on params[part] (elementwise: pieces give the same numbers as one pass)."""
        lr, (b1, b2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        p, g, m, v = self.params[part], self.grads[part], self.exp_avg[part], self.exp_avg_sq[part]
        t1, t2 = self._t1[:len(p)], self._t2[:len(p)]
        t = self.step
        if wd != 0:
            p *= np.float32(1 - lr * wd)
        # m.lerp_(g, 1-b1): m + w*(g - m)
        np.subtract(g, m, out=t1)
        t1 *= np.float32(1 - b1)
        m += t1
        # v.mul_(b2).addcmul_(g, g, value=1-b2)
        v *= np.float32(b2)
        np.multiply(g, g, out=t1)
        t1 *= np.float32(1 - b2)
        v += t1
        bc1 = 1 - b1 ** t
        bc2 = 1 - b2 ** t
        step_size = lr / bc1
        bc2_sqrt = math.sqrt(bc2)
        # denom = (v.sqrt() / bc2_sqrt).add_(eps); p.addcdiv_(m, denom, value=-step_size)
        np.sqrt(v, out=t2)
        t2 /= np.float32(bc2_sqrt)
        t2 += np.float32(eps)
        np.divide(m, t2, out=t1)
        t1 *= np.float32(-step_size)
        p += t1
