"""Every hook raises: the server must log each failure and carry on."""

workers = 1


def _boom(*args):
    raise RuntimeError("hook failed on purpose")


on_starting = when_ready = on_reload = pre_fork = post_fork = post_worker_init = _boom
worker_int = worker_abort = pre_exec = pre_request = post_request = child_exit = _boom
worker_exit = nworkers_changed = on_exit = on_message = _boom
