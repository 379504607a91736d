"""How far a cache moves the model's next-token distribution from the dense one: KL divergence and top-1 agreement.

Perplexity only reads the probability of the token that came next; two caches with the same perplexity can
spread the rest of the distribution very differently. Here, per scored position t,

    KLD_t = KL(p_dense,t || p_cache,t) = sum_v p_dense(v) (log p_dense(v) - log p_cache(v))     (nats)
    top1_t = argmax p_cache,t == argmax p_dense,t

averaged over the positions that ``perplexity.nlls_through_cache`` scores, on the same text and chunking.

The dense run is made once per text and remembered by :class:`DenseDistributions`; every other cache is
scored against that memory chunk by chunk (:class:`Divergence`), so the dense model never runs twice and
no cache's logits are kept past their chunk. What is remembered per position is the dense log-probabilities
of its ``keep`` most likely tokens, their token ids, and the log of the mass of all the others (the tail):

* ``keep = vocab`` whenever the whole table fits ``DENSE_BUDGET_BYTES`` (SmolLM2, 49,152 tokens, 1,792
  positions: 352 MB). The KL is then exact.
* otherwise ``keep`` is as large as the budget allows, and the KL is taken between the two distributions
  coarse-grained to those ``keep`` tokens plus one bucket for the tail. By the data-processing inequality
  that is a lower bound on the full KL, short of it by ``tail mass x KL of the two tails, each renormalized``.
  The tail mass is recorded (``dense_tail_mass_mean``) so a reader sees how small that gap can be.

Storing fewer bits per entry (fp16 log-probs) would cost ~1e-3 nats of rounding, the size of the 4-bit KLD
itself; running the dense model in lockstep with each cache would cost a second forward per cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The dense distributions of one text are held in CPU memory up to this many bytes.
DENSE_BUDGET_BYTES = 512 * 2**20
_FULL_ENTRY_BYTES = 4  # float32 log-prob
_TOP_ENTRY_BYTES = 8  # float32 log-prob + int32 token id


def kept_tokens(vocab_size: int, positions: int, budget_bytes: int = DENSE_BUDGET_BYTES) -> int:
    """How many of the most likely dense tokens to keep per position: the whole vocabulary if it fits."""
    if vocab_size * positions * _FULL_ENTRY_BYTES <= budget_bytes:
        return vocab_size
    return max(1, min(vocab_size, budget_bytes // (positions * _TOP_ENTRY_BYTES)))


def _tail_log_mass(log_probs: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
    """log of the probability outside ``token_ids``: log_probs (positions, vocab) f32 -> (positions,) f64.

    A logsumexp over the excluded entries, not log(1 - kept mass): the tail is often below float32's epsilon.
    """
    if token_ids is None:
        return torch.full(log_probs.shape[:1], float("-inf"), dtype=torch.float64, device=log_probs.device)
    excluded = log_probs.scatter(1, token_ids.long(), float("-inf"))
    return torch.logsumexp(excluded.double(), dim=1)


def kl_per_position(dense_log_probs: torch.Tensor, dense_tail_log_mass: torch.Tensor, token_ids: torch.Tensor | None,
                    cache_logits: torch.Tensor) -> torch.Tensor:
    """KL(dense || cache) per position, in nats: (positions,) float64.

    dense_log_probs: (positions, keep) f32, log p_dense of the kept tokens;
    dense_tail_log_mass: (positions,) f64, log of p_dense outside them (-inf when every token is kept);
    token_ids: (positions, keep) int, the kept tokens, or None when keep = vocab (then in vocabulary order);
    cache_logits: (positions, vocab) float logits of the cache run.
    """
    cache_log_probs = F.log_softmax(cache_logits.float(), dim=-1)
    kept_cache = cache_log_probs if token_ids is None else cache_log_probs.gather(1, token_ids.long())
    dense = dense_log_probs.double()
    kl = (dense.exp() * (dense - kept_cache.double())).sum(dim=1)
    if token_ids is None:
        return kl
    cache_tail = _tail_log_mass(cache_log_probs, token_ids)
    dense_tail = dense_tail_log_mass.double().to(kl.device)
    # 0 log 0 = 0: a dense tail of zero mass adds nothing, whatever the cache puts there.
    tail_term = torch.where(dense_tail > float("-inf"), dense_tail.exp() * (dense_tail - cache_tail),
                            torch.zeros_like(kl))
    return kl + tail_term


class DenseDistributions:
    """The dense run's next-token distributions of one text, recorded chunk by chunk.

    Pass an instance as ``observe`` to ``perplexity.nlls_through_cache`` for the DynamicCache run; then
    score every other cache with ``Divergence(dense)`` on the same text, prefill and chunk.
    """

    def __init__(self, positions: int, budget_bytes: int = DENSE_BUDGET_BYTES):
        self.positions = positions
        self.budget_bytes = budget_bytes
        self.vocab_size: int | None = None  # read from the first chunk's logits
        self.keep: int | None = None
        # Per chunk: (log-probs (n, keep) f32, token ids (n, keep) int32 or None, tail log mass (n,) f64,
        # argmax (n,) long); all on the CPU.
        self.chunks: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []

    @property
    def exact(self) -> bool:
        return self.keep == self.vocab_size

    def __call__(self, logits: torch.Tensor) -> None:
        """Record one chunk: logits (n, vocab) float of the dense run."""
        logits = logits.float()
        if self.keep is None:
            self.vocab_size = logits.shape[-1]
            self.keep = kept_tokens(self.vocab_size, self.positions, self.budget_bytes)
        log_probs = F.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1)
        if self.exact:
            kept, token_ids = log_probs, None
        else:
            kept, token_ids = log_probs.topk(self.keep, dim=-1)
            token_ids = token_ids.int()
        tail = _tail_log_mass(log_probs, token_ids)
        self.chunks.append((kept.cpu(), None if token_ids is None else token_ids.cpu(), tail.cpu(), argmax.cpu()))

    def tail_mass_mean(self) -> float:
        """Mean dense probability outside the kept tokens (0.0 when the KL is exact)."""
        tails = torch.cat([tail for _, _, tail, _ in self.chunks])
        return tails.exp().mean().item()


class Divergence:
    """KL(dense || cache) and top-1 agreement of one cache run, fed chunk by chunk like DenseDistributions."""

    def __init__(self, dense: DenseDistributions):
        self.dense = dense
        self.kl: list[torch.Tensor] = []
        self.agrees: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> None:
        """Score the next chunk: logits (n, vocab) float of the cache run, n as in the dense chunk."""
        index = len(self.kl)
        if index >= len(self.dense.chunks):
            raise ValueError(f"chunk {index} has no dense counterpart: the dense run had {len(self.dense.chunks)} "
                             "chunks; score a cache on the same text, prefill and chunk")
        log_probs, token_ids, tail, argmax = self.dense.chunks[index]
        if logits.shape[0] != log_probs.shape[0]:
            raise ValueError(f"chunk {index} has {logits.shape[0]} positions, the dense one {log_probs.shape[0]}")
        device = logits.device
        kl = kl_per_position(log_probs.to(device), tail.to(device), None if token_ids is None else token_ids.to(device),
                             logits)
        self.kl.append(kl.cpu())
        self.agrees.append(logits.float().argmax(dim=-1).cpu() == argmax)

    @staticmethod
    def of_reference(dense: DenseDistributions) -> dict:
        """``result()`` of the dense run against itself, without scoring it: KL 0, agreement 1."""
        return {"kld": 0.0, "kld_max": 0.0, "top1_agreement": 1.0, "kld_exact": dense.exact,
                "kld_kept_tokens": dense.keep, "dense_tail_mass_mean": dense.tail_mass_mean()}

    def result(self) -> dict:
        """{"kld": mean KL in nats, "top1_agreement": fraction, ...} over the scored positions."""
        if len(self.kl) != len(self.dense.chunks):
            raise ValueError(f"scored {len(self.kl)} of the dense run's {len(self.dense.chunks)} chunks")
        kl = torch.cat(self.kl)
        agrees = torch.cat(self.agrees)
        return {"kld": kl.mean().item(), "kld_max": kl.max().item(), "top1_agreement": agrees.double().mean().item(),
                "kld_exact": self.dense.exact, "kld_kept_tokens": self.dense.keep,
                "dense_tail_mass_mean": self.dense.tail_mass_mean()}
