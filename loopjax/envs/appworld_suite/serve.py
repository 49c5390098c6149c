"""AppWorld's environment server as loopjax runs it: on a Unix socket, in AppWorld's venv.

    $APPWORLD_PYTHON serve.py --root ROOT --socket PATH

The app is AppWorld's own (`appworld.serve.environment`, the same routes and replies) with two
changes. It listens on a Unix socket that only this user can open, where `appworld serve
environment` binds 0.0.0.0 with no host option (an endpoint that runs any code it is sent, open
to the network). A request about a world that is not loaded answers 409 with its reason: upstream
hands HTTPException a string, which answers 500, the same status as a crash.
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="APPWORLD_ROOT (the folder holding data/)")
    parser.add_argument("--socket", required=True, help="the Unix socket path to listen on")
    args = parser.parse_args(argv)
    os.environ["APPWORLD_ROOT"] = os.path.abspath(args.root)
    os.chdir(args.root)
    import appworld.serve.environment as server
    import uvicorn
    from fastapi import HTTPException

    def maybe_raise_exception(task_id: str) -> None:
        if server.world is None:
            raise HTTPException(409, "AppWorld has not been initialized.")
        if server.world.task_id != task_id:
            raise HTTPException(409, f"The active task world is {server.world.task_id}, "
                                f"not {task_id}.")

    server.maybe_raise_exception = maybe_raise_exception  # the routes look it up per call
    # uvicorn makes the socket file 0666 whatever the umask: the adapter puts it in a folder of
    # mode 0700, which is what keeps other users out.
    uvicorn.run(server.app, uds=args.socket, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
