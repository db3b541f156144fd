"""`DisaggConfig`: the process layout of `tandem serve` (one flag per field)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.disagg.policy import DisaggPolicy

KV_CONNECTORS = ("auto", "shm", "ipc", "nccl")


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"a worker address is HOST:PORT, got {text!r}")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    prefill_workers: int = 0  # engine processes that only prefill (0: no disaggregation)
    decode_workers: int = 1  # engine processes that decode (and prefill what stays local)
    # always | never | conditional: which prompts prefill on a prefill worker
    disagg_policy: str = "conditional"
    # conditional: remote only if at least this many prompt tokens are uncached
    disagg_min_remote_tokens: int = 2048
    # conditional: and at least this fraction of the prompt is uncached
    disagg_min_uncached_fraction: float = 0.7
    # conditional: the prefill side counts as saturated at this many queued prompt tokens
    disagg_max_prefill_queue_tokens: int = 65536
    # seconds a decode worker waits for KV that was sent before prefilling itself
    kv_transfer_timeout: float = 30.0
    # how KV moves: shm (a shared-memory file, host-staged), ipc (CUDA IPC handles in the
    # message: device to device, workers on one GPU), nccl (point-to-point sends between
    # GPUs; gloo on a CPU), auto (ipc on one GPU, nccl between GPUs, else shm)
    kv_connector: str = "auto"
    # HOST:PORT[,HOST:PORT...] of `tandem worker`s started elsewhere, used as prefill
    # (remote_prefill) or decode (remote_decode) workers besides the local ones
    remote_prefill: str | None = None
    remote_decode: str | None = None
    # the address the workers reach this machine at for the point-to-point KV group
    # (default: 127.0.0.1, one machine)
    kv_group_address: str | None = None

    def __post_init__(self) -> None:
        if self.prefill_workers < 0 or self.decode_workers < 1:
            raise ValueError("prefill_workers >= 0 and decode_workers >= 1")
        if self.kv_transfer_timeout <= 0:
            raise ValueError("kv_transfer_timeout must be > 0")
        if self.kv_connector not in KV_CONNECTORS:
            raise ValueError(f"kv_connector must be one of {KV_CONNECTORS}")
        self.policy()  # validates the rule's fields
        for text in (self.remote_prefill, self.remote_decode):
            for addr in (text or "").split(","):
                if addr.strip():
                    parse_address(addr)
        if self.remote_workers and self.kv_connector in ("shm", "ipc"):
            raise ValueError("workers on other machines take KV over point-to-point sends: "
                             "--kv-connector nccl (or auto)")

    @property
    def remote_workers(self) -> list[tuple[str, tuple[str, int]]]:
        """[(role, (host, port))] of the workers given by address."""
        return [(role, parse_address(a)) for role, text in
                (("decode", self.remote_decode), ("prefill", self.remote_prefill))
                for a in (text or "").split(",") if a.strip()]

    @property
    def enabled(self) -> bool:
        """More than the one engine process of a plain `tandem serve`."""
        return self.prefill_workers > 0 or self.decode_workers > 1 or \
            bool(self.remote_workers)

    def policy(self) -> DisaggPolicy:
        return DisaggPolicy(self.disagg_policy, self.disagg_min_remote_tokens,
                            self.disagg_min_uncached_fraction,
                            self.disagg_max_prefill_queue_tokens)
