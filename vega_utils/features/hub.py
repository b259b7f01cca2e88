"""Where an extractor's model comes from: a local folder (saved with save_pretrained), or a hub name, read from the
local cache or downloaded. Looked at before any model loads, so that a model that cannot come ends in one line at
once: a folder that is not there is named as a folder, and a hub name that is not in the cache while the hub
cannot be reached (HF_HUB_OFFLINE, or no network) is said without the library's retries (about a minute).
"""
import os
import threading

from vega_utils.common import VegaError
from vega_utils.features.record import model_folder


def resolved(name):
    """A local folder as an absolute path (so that the record, and --like, work from any folder); a hub name as is."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def require_models(settings, where="", text=True):
    """Each model of an extraction's settings checked before any loads (where: the record it came from, as a
    message names it; '' for flags). text=False: the text encoder comes from elsewhere (a recorded fine-tune)."""
    if text:
        require_model(settings.text_model, f"{where}: its text model" if where else "--text_model")
    if settings.audio.startswith("hf:"):
        require_model(settings.audio[3:], f"{where}: its audio model" if where else "--audio", settings.audio)
    require_model(settings.visual_model, f"{where}: its visual model" if where else "--visual_model")


def looks_like_folder(name):
    """A name no hub repository has (hub names are NAME or OWNER/NAME), or one whose parent folder is here."""
    parent = os.path.dirname(name)
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")
            or (os.sep != "/" and os.sep in name) or (parent != "" and os.path.isdir(parent)))


def require_model(name, what, shown=None):
    """One line (what: '--text_model', ...; shown: the name as the message writes it) when the model cannot come
    from a folder, the cache or the hub; nothing when it can (or may)."""
    if os.path.isdir(name):
        return
    what = f"{what} {shown or name}"
    if looks_like_folder(name):
        raise VegaError(f"{what}: no such folder (a model folder saved with save_pretrained, or a hub name "
                        f"such as roberta-large)")
    if model_folder(name) is not None:          # in the local cache
        return
    why = offline()
    if why:
        raise VegaError(f"{what}: not a folder and not in the local model cache ({cache_folder()}), and "
                        f"the hub cannot be reached ({why}); download it on a machine with a network "
                        f"(hf download {name}) and copy the cache, or give a folder saved with "
                        f"save_pretrained")


def reason(error, limit=200):
    """A library's error as a short whole clause: its first line, cut at the last sentence end within `limit`."""
    text = (str(error).strip().splitlines() or [""])[0].strip() or type(error).__name__
    if len(text) > limit:
        end = text.rfind(". ", 0, limit)
        text = text[:end + 1] if end > 40 else text[:text.rfind(" ", 0, limit)] + " ..."
    return f"{type(error).__name__}: {text}"


def cache_folder():
    try:
        from huggingface_hub import constants
        return constants.HF_HUB_CACHE
    except Exception:
        return "the hub cache"


def truthy(value):
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def offline(seconds=3.0):
    """Why the hub cannot be reached ('' when it may be): HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or no connection
    to its address within `seconds` (looked up in a thread, as a name lookup without a network can hang)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if truthy(os.environ.get(var)):
            return f"{var}={os.environ[var]}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""                               # through a proxy: only the library can tell
    try:
        from urllib.parse import urlparse

        from huggingface_hub import constants
        url = urlparse(constants.ENDPOINT)
    except Exception:
        return ""
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    answer = []

    def connect():
        import socket
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            answer.append("")
        except OSError as e:
            answer.append(f"no connection to {host}: {e.strerror or type(e).__name__}")
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(seconds + 0.5)
    return answer[0] if answer else f"no answer from {host} in {seconds:g} s"
