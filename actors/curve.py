"""CurveZMQ for the fleet: key files, the broker's authenticator, and the bind policy.

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes them:
``NAME.key`` (public) and ``NAME.key_secret`` (public and secret). The broker
serves CurveZMQ on both endpoints when ``curve_server_secret`` is set, and lets in
only peers whose public key is in ``curve_authorized_dir`` (re-read when that
folder changes), plus the supervisor's own key for the workers it spawns.
Authentication is pyzmq's ZAP handler (``zmq.auth.thread.ThreadAuthenticator``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from actors.config import ConfigError, FleetConfig

log = logging.getLogger("mlx_fleet.curve")

CurveKeys = dict[str, bytes]  # {"public", "secret", "server"} as z85 bytes
SERVER_NAME = "broker"
DEFAULT_KEY_NAMES = (SERVER_NAME, "client", "worker")


# ---- key files ------------------------------------------------------------------


def make_keys(key_dir: str | os.PathLike[str], names: tuple[str, ...] = DEFAULT_KEY_NAMES, *,
              force: bool = False) -> dict[str, tuple[Path, Path]]:
    """Write a key pair per name into ``key_dir``; every name but ``broker`` is also authorised.

    Returns ``{name: (public_path, secret_path)}``. The public certs of the
    non-server names are copied into ``key_dir/authorized``, the folder to give
    the broker as ``curve_authorized_dir``. Existing files are kept unless ``force``.
    """
    folder = Path(key_dir)
    authorized = folder / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, Path]] = {}
    for name in names:
        public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
        if (public.exists() or secret.exists()) and not force:
            raise FileExistsError(f"{public} or {secret} exists; pass --force to replace the key pair")
        pub_path, sec_path = zmq.auth.create_certificates(str(folder), name)
        os.chmod(sec_path, 0o600)
        if name != SERVER_NAME:
            shutil.copyfile(pub_path, authorized / f"{name}.key")
        out[name] = (Path(pub_path), Path(sec_path))
    return out


def load_client_keys(secret_path: str, server_public_path: str) -> CurveKeys:
    """Our key pair (from a secret cert) and the broker's public key, for a client-side socket."""
    public, secret = _load(secret_path, need_secret=True)
    server, _ = _load(server_public_path, need_secret=False)
    assert secret is not None
    return {"public": public, "secret": secret, "server": server}


def _load(path: str, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CurveZMQ certificate {path}: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{path} holds no secret key (give the NAME.key_secret file, not NAME.key)")
    return public, secret


def apply_client(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Configure CurveZMQ on a client-side socket (before connect)."""
    sock.curve_publickey = keys["public"]
    sock.curve_secretkey = keys["secret"]
    sock.curve_serverkey = keys["server"]


def client_keys_from_config(cfg: FleetConfig) -> CurveKeys | None:
    """The client keys a config names, or None when curve is off for clients."""
    if not cfg.curve_client_secret:
        return None
    return load_client_keys(cfg.curve_client_secret, cfg.curve_server_public)


# ---- the broker's side ------------------------------------------------------------


class AuthorizedKeys:
    """ZAP credentials provider: public keys in a folder (re-read on change) plus extra keys."""

    def __init__(self, folder: str, extra: set[bytes] | None = None) -> None:
        self.folder = folder
        self.extra = set(extra or ())
        self._stamp: tuple[tuple[str, float], ...] | None = None
        self._keys: set[bytes] = set()

    def keys(self) -> set[bytes]:
        """The authorised z85 public keys now (the folder is re-read when a cert changes)."""
        try:
            files = sorted(p for p in Path(self.folder).iterdir() if p.suffix == ".key")
            stamp = tuple((p.name, p.stat().st_mtime) for p in files)
            if stamp != self._stamp:
                self._keys = {k for k, ok in zmq.auth.load_certificates(self.folder).items() if ok}
                self._stamp = stamp
        except (OSError, ValueError) as exc:  # keep the last good set; a bad cert must not stop auth
            log.warning("cannot read curve_authorized_dir %s: %s", self.folder, exc)
        return self._keys | self.extra

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the ZAP handler for each CurveZMQ handshake."""
        allowed = key in self.keys()
        if not allowed:
            log.warning("refused a CurveZMQ peer with an unauthorised key %s", key.decode(errors="replace"))
        return allowed


def start_server_auth(ctx: zmq.SyncContext, cfg: FleetConfig, sockets: list[zmq.SyncSocket]) -> ThreadAuthenticator:
    """Start the ZAP handler and make ``sockets`` CurveZMQ servers (call before bind)."""
    public, secret = _load(cfg.curve_server_secret, need_secret=True)
    if not Path(cfg.curve_authorized_dir).is_dir():
        raise ConfigError(f"curve_authorized_dir {cfg.curve_authorized_dir} is not a folder")
    extra: set[bytes] = set()
    local = local_public_cert(cfg)
    if local is not None:
        extra.add(_load(str(local), need_secret=False)[0])
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", AuthorizedKeys(cfg.curve_authorized_dir, extra))
    for sock in sockets:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    return auth


def local_public_cert(cfg: FleetConfig) -> Path | None:
    """The supervisor's key for the workers it spawns, if it made one."""
    if not cfg.runtime_dir:
        return None
    path = Path(cfg.runtime_dir) / "local.key"
    return path if path.exists() else None


def local_secret_cert(cfg: FleetConfig) -> str:
    """The secret cert of the supervisor's own children when CurveZMQ is on, else ''.

    With CurveZMQ on, the supervisor makes a key pair in its runtime folder that the
    broker authorises besides ``curve_authorized_dir``; any child it spawns may use it.
    """
    if not cfg.curve_server_secret or not cfg.runtime_dir:
        return ""
    return str(Path(cfg.runtime_dir) / "local.key_secret")


def local_client_keys(cfg: FleetConfig) -> CurveKeys | None:
    """Client keys for the supervisor's own client processes (a local gateway), or None."""
    secret = local_secret_cert(cfg)
    return load_client_keys(secret, cfg.curve_server_secret) if secret else None


def make_local_keys(runtime_dir: str) -> Path:
    """A key pair for the supervisor's own workers, in its private folder; returns the secret cert."""
    _, secret = zmq.auth.create_certificates(runtime_dir, "local")
    os.chmod(secret, 0o600)
    return Path(secret)


# ---- bind policy --------------------------------------------------------------------


def is_loopback(addr: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host; False for wildcards and interfaces."""
    scheme, _, rest = addr.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name


def check_bind_policy(cfg: FleetConfig) -> list[str]:
    """Refuse non-loopback endpoints without CurveZMQ unless ``insecure``; return the warnings."""
    exposed = [a for a in (cfg.frontend, cfg.backend) if not is_loopback(a)]
    if not exposed or cfg.curve_server_secret:
        return []
    if not cfg.insecure:
        raise ConfigError(
            f"refusing to bind {', '.join(exposed)} without CurveZMQ: anyone who can reach it could use the fleet. "
            "Set curve_server_secret and curve_authorized_dir (keys from `mlx-fleet keys DIR`), "
            "or pass --insecure (insecure = true) to bind it in the clear")
    return [f"binding {a} WITHOUT authentication or encryption (--insecure)" for a in exposed]
