"""`DirectionPairs`: decoding directions (filters + thresholds) and encoding directions (signal vectors)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from .._errors import ValidationError
from .._io import load_bundle, save_bundle
from .._validation import as_tensor, check_maps


class DirectionPairs:
    """I concepts of one layer, each a pair of directions in the layer's D-dimensional space.

    Parameters
    ----------
    decoders : (I, D) tensor
        Row i is the decoding direction with its magnitude, ``g_i * w̄_i``.
    biases : (I,) tensor
        Detector thresholds ``b_i``: concept i is detected where ``σ(w_iᵀx − b_i) > 0.5``.
    encoders : (I, D) tensor
        Signal vectors ``ŝ_i`` (how concept i is written into the representation).
    mean : (D,) tensor, optional
        The data mean ``E[x]``; signal values are measured relative to it (zeros if omitted).
    names : list of str, optional
        A label per concept (e.g. from dissection). Defaults to ``"concept_<i>"``.
    meta : dict, optional
        Free-form JSON-serialisable metadata (layer, model, seed, method, ...).

    Examples
    --------
    >>> import torch
    >>> from unveil import DirectionPairs
    >>> p = DirectionPairs(torch.eye(2), torch.zeros(2), torch.eye(2))
    >>> p.detect(torch.ones(1, 2, 3, 3)).shape
    torch.Size([1, 2, 3, 3])
    """

    def __init__(self, decoders, biases, encoders, mean=None, names: Optional[List[str]] = None,
                 meta: Optional[dict] = None):
        # contiguous copies: results must not depend on the memory layout of the inputs
        W = as_tensor(decoders, "decoders").detach().contiguous()
        b = as_tensor(biases, "biases").detach().contiguous()
        S = as_tensor(encoders, "encoders").detach().contiguous()
        if W.dim() != 2:
            raise ValidationError(f"decoders must be (I, D), got shape {tuple(W.shape)}.")
        n, d = W.shape
        if b.shape != (n,):
            raise ValidationError(f"biases must have shape ({n},) to match decoders {tuple(W.shape)}, got {tuple(b.shape)}.")
        if S.shape != (n, d):
            raise ValidationError(f"encoders must have shape {(n, d)} to match decoders, got {tuple(S.shape)}.")
        m = torch.zeros(d) if mean is None else as_tensor(mean, "mean").detach()
        if m.shape != (d,):
            raise ValidationError(f"mean must have shape ({d},), got {tuple(m.shape)}.")
        for name, t in (("decoders", W), ("biases", b), ("encoders", S), ("mean", m)):
            if not torch.isfinite(t).all():
                raise ValidationError(f"{name} contains NaN or infinite values.")
        self.decoders, self.biases, self.encoders, self.mean = W, b, S, m.to(W.device)
        if names is None:
            names = [f"concept_{i}" for i in range(n)]
        if len(names) != n:
            raise ValidationError(f"names must have one entry per concept ({n}), got {len(names)}.")
        self.names = [str(x) for x in names]
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ shape
    @property
    def n_concepts(self) -> int:
        return self.decoders.shape[0]

    @property
    def n_features(self) -> int:
        return self.decoders.shape[1]

    def __len__(self) -> int:
        return self.n_concepts

    def __repr__(self) -> str:
        layer = self.meta.get("layer")
        return (f"DirectionPairs(n_concepts={self.n_concepts}, n_features={self.n_features}"
                + (f", layer={layer!r}" if layer else "") + ")")

    def to(self, device) -> "DirectionPairs":
        return DirectionPairs(self.decoders.to(device), self.biases.to(device), self.encoders.to(device),
                              self.mean.to(device), self.names, self.meta)

    # --------------------------------------------------------------- compute
    def _project(self, X) -> torch.Tensor:
        """``w_iᵀx`` per position; float32, or float64 where float32 overflows (|x| near 3.4e38)."""
        X = check_maps(X, "X", n_features=self.n_features, detach=False,
                       context=f"these direction pairs (layer {self.meta.get('layer', '?')!r})")
        z = _einsum(X, self.decoders.to(X.device))
        if not torch.isfinite(z).all():
            # finite inputs whose products or sums leave float32's range: exact enough in float64
            z = _einsum(X.double(), self.decoders.to(X.device, torch.float64))
        return z

    def _bias_shape(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        v = v.to(z.device, z.dtype)
        return v if z.dim() == 2 else v[None, :, None, None]

    def decision_function(self, X) -> torch.Tensor:
        """``w_iᵀx − b_i`` per position: (N, I, H, W) for maps, (P, I) for patches."""
        z = self._project(X)
        d = z - self._bias_shape(z, self.biases)
        if not torch.isfinite(d).all():
            z = z.double()
            d = z - self._bias_shape(z, self.biases)
        return _as_float32(d, "decision values w_iᵀx − b_i")

    def detect(self, X) -> torch.Tensor:
        """Detector activations ``σ(w_iᵀx − b_i)`` in [0, 1]; concept present where > 0.5."""
        z = self._project(X)
        return torch.sigmoid(z - self._bias_shape(z, self.biases)).float()

    def signal_values(self, X) -> torch.Tensor:
        """Mean-centred latent factors ``(w_iᵀx − w_iᵀE[x]) / (w_iᵀŝ_i)`` (method.md §3)."""
        z = self._project(X)
        W = self.decoders.to(z.device)
        offset = W @ self.mean.to(z.device)
        scale = (W * self.encoders.to(z.device)).sum(1)
        tiny = scale.abs() < 1e-12
        if tiny.any():
            raise ValidationError(f"decoder and encoder of concepts {tiny.nonzero().flatten().tolist()} are "
                                  f"orthogonal (wᵀŝ = 0), so their signal values are undefined.")
        out = (z - self._bias_shape(z, offset)) / self._bias_shape(z, scale)
        if not torch.isfinite(out).all():
            W = W.double()
            offset, scale = W @ self.mean.to(z.device, torch.float64), (W * self.encoders.to(z.device)).sum(1)
            z = z.double()
            out = (z - self._bias_shape(z, offset)) / self._bias_shape(z, scale)
        return _as_float32(out, "signal values")

    # ----------------------------------------------------------- persistence
    def save(self, path, overwrite: bool = True) -> Path:
        """Save to the folder ``path`` as ``pairs.json`` + ``pairs.safetensors`` (one transaction; no pickle).

        Files of those names that unveil did not write are never replaced; saved pairs are replaced
        only when ``overwrite``.
        """
        return save_bundle(path, "pairs", {"decoders": self.decoders, "biases": self.biases,
                                            "encoders": self.encoders, "mean": self.mean},
                           {"n_concepts": self.n_concepts, "n_features": self.n_features,
                            "names": self.names, "meta": self.meta}, overwrite=overwrite)

    @classmethod
    def load(cls, path, device="cpu") -> "DirectionPairs":
        """Load pairs saved by :meth:`save`; raises :class:`CorruptFileError` on a damaged folder."""
        from .._errors import CorruptFileError
        tensors, doc = load_bundle(path, "pairs")
        names, meta = doc.get("names"), doc.get("meta")
        if names is not None and not (isinstance(names, list) and all(isinstance(v, str) for v in names)):
            raise CorruptFileError(f"saved pairs at {str(path)!r}: 'names' is a {type(names).__name__}, expected a "
                                   f"list of strings. Save the pairs again.")
        if meta is not None and not isinstance(meta, dict):
            raise CorruptFileError(f"saved pairs at {str(path)!r}: 'meta' is a {type(meta).__name__}, expected an "
                                   f"object (dict). Save the pairs again.")
        try:
            obj = cls(tensors["decoders"], tensors["biases"], tensors["encoders"], tensors["mean"],
                      names=doc.get("names"), meta=doc.get("meta"))
        except (KeyError, TypeError, ValueError) as exc:  # ValidationError is a ValueError
            raise CorruptFileError(f"saved pairs at {str(path)!r} are inconsistent ({exc}).") from None
        return obj.to(device)


def _einsum(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return X @ W.T if X.dim() == 2 else torch.einsum("ndhw,id->nihw", X, W)


def _as_float32(z: torch.Tensor, what: str) -> torch.Tensor:
    """``z`` as float32; a value beyond float32's range (about 3.4e38) is refused, never returned as inf/NaN."""
    out = z.float()
    if not torch.isfinite(out).all():
        big = float(z.detach().abs().max())
        raise ValidationError(f"the {what} reach {big:.3g}, beyond the float32 range (3.4e38): the activations "
                              f"are too large for these direction pairs. Rescale the maps (e.g. divide by their "
                              f"largest value) or check the model's numerics.")
    return out
