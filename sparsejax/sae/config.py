"""SAEConfig: every setting of a sparse autoencoder or transcoder, checked once at construction."""
import dataclasses

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "threshold")
TOPK_KINDS = ("topk", "batchtopk")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """The architecture and penalties of one dictionary of `num_latents` latents.

  Attributes:
    d_in: width of the input x.
    num_latents: N, the dictionary size.
    kind: the activation: "relu" (with the decoder-norm-weighted L1), "topk" (k largest per
      token), "batchtopk" (k * T largest of the batch in training, a single threshold at
      inference), "jumprelu" (a learned threshold per latent, L0 penalty) or "threshold" (a fixed
      global threshold `threshold`).
    k: active latents per token for the top-k kinds (the batch average for "batchtopk").
    d_out: None for an autoencoder (it reconstructs its input); the target width for a
      transcoder, which predicts a target (e.g. an MLP's output) from its input and does not
      subtract b_dec from its input. It may equal d_in.
    skip: a skip transcoder's linear path x W_skip added to the output (needs d_out).
    approx: select the top-k kinds' latents with `jax.lax.approx_max_k` (TPU's fast approximate
      top-k; exact elsewhere) instead of `jax.lax.top_k`.
    l1_coeff: weight of the decoder-norm-weighted L1 penalty, any kind ("relu"'s only sparsity
      pressure). A coefficient of 0 leaves its penalty out.
    l0_coeff: weight of the JumpReLU L0 penalty (kind "jumprelu" only; 0 for a JumpReLU SAE whose
      thresholds stay as they are, e.g. one exported from BatchTopK).
    bandwidth: width of the rectangle kernel of the JumpReLU straight-through estimator.
    init_threshold: the JumpReLU threshold every latent starts from.
    threshold: the global threshold of kind "threshold".
    auxk: latents in the AuxK dead-latent reconstruction; None: half the reconstruction width
      (d_model / 2 in Gao et al.), at most num_latents. auxk_coeff: its weight (0 turns AuxK
      off); top-k kinds only.
    dead_after_tokens: a latent that has not fired for this many tokens is dead.
    threshold_ema: rate of the exponential moving average of the smallest activation BatchTopK
      keeps, its inference threshold.
    matryoshka: nested prefix sizes m_1 < m_2 < ... <= num_latents; each prefix [0, m) must
      reconstruct the target on its own. matryoshka_coeff: weight of those prefix losses.
    orthogonality_coeff: weight of the OrtSAE decoder orthogonality penalty (0 turns it off).
    orthogonality_chunks: K, the chunks the latents are split into for that penalty (K must
      divide num_latents into chunks of at least 2): its cost is N^2 / K.
  """

  d_in: int
  num_latents: int
  kind: str = "topk"
  k: int = 32
  d_out: int | None = None
  skip: bool = False
  approx: bool = False
  l1_coeff: float = 0.0
  l0_coeff: float = 0.0
  bandwidth: float = 1e-3
  init_threshold: float = 1e-3
  threshold: float = 0.0
  auxk: int | None = None
  auxk_coeff: float = 1 / 32
  dead_after_tokens: int = 10_000_000
  threshold_ema: float = 0.01
  matryoshka: tuple[int, ...] = ()
  matryoshka_coeff: float = 1.0
  orthogonality_coeff: float = 0.0
  orthogonality_chunks: int = 1

  def __post_init__(self):
    object.__setattr__(self, "matryoshka", tuple(self.matryoshka))
    _check_positive_int("d_in", self.d_in)
    _check_positive_int("num_latents", self.num_latents)
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r}; allowed: {', '.join(KINDS)}")
    if self.d_out is not None:
      _check_positive_int("d_out", self.d_out)
    if self.kind in TOPK_KINDS and not 1 <= self.k <= self.num_latents:
      raise ValueError(f"k={self.k} must be in [1, num_latents={self.num_latents}]")
    if self.skip and self.d_out is None:
      raise ValueError("skip=True needs a transcoder (set d_out): an autoencoder's skip path "
                       "would learn the identity")
    for name in ("l1_coeff", "l0_coeff", "threshold", "auxk_coeff", "matryoshka_coeff",
                 "orthogonality_coeff"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
    for name in ("bandwidth", "init_threshold"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be > 0")
    if self.l0_coeff > 0 and self.kind != "jumprelu":
      raise ValueError(f"l0_coeff={self.l0_coeff} needs kind='jumprelu' (the L0 gradient comes "
                       f"from its threshold), got kind={self.kind!r}")
    if self.auxk is not None and not 1 <= self.auxk <= self.num_latents:
      raise ValueError(f"auxk={self.auxk} must be None or in [1, num_latents={self.num_latents}]")
    _check_positive_int("dead_after_tokens", self.dead_after_tokens)
    if not 0 < self.threshold_ema <= 1:
      raise ValueError(f"threshold_ema={self.threshold_ema} must be in (0, 1]")
    _check_matryoshka(self.matryoshka, self.num_latents)
    _check_positive_int("orthogonality_chunks", self.orthogonality_chunks)
    chunk_size, remainder = divmod(self.num_latents, self.orthogonality_chunks)
    if remainder or chunk_size < 2:
      raise ValueError(f"orthogonality_chunks={self.orthogonality_chunks} must divide "
                       f"num_latents={self.num_latents} into chunks of at least 2 latents")

  @property
  def transcoder(self) -> bool:
    """Whether the dictionary predicts a separate target (d_out was given)."""
    return self.d_out is not None

  @property
  def out_dim(self) -> int:
    """The width of the reconstruction: d_out for a transcoder, d_in for an autoencoder."""
    return self.d_in if self.d_out is None else self.d_out

  @property
  def auxk_latents(self) -> int:
    """k_aux, the number of dead latents AuxK reconstructs the residual with."""
    default = max(self.out_dim // 2, 1)
    return min(self.num_latents, default if self.auxk is None else self.auxk)


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")


def _check_matryoshka(prefixes: tuple[int, ...], num_latents: int) -> None:
  """ValueError unless the prefixes are positive ints, strictly increasing, <= num_latents."""
  for m in prefixes:
    _check_positive_int("matryoshka prefix", m)
  if any(b <= a for a, b in zip(prefixes, prefixes[1:])):
    raise ValueError(f"matryoshka={prefixes} must be strictly increasing")
  if prefixes and prefixes[-1] > num_latents:
    raise ValueError(f"matryoshka={prefixes} has a prefix above num_latents={num_latents}")
