"""Code that runs inside the sandbox's own processes: zygote, harness, init, program.

Standard library only, and no import from outside this directory: the boot stub
(``verifiers/sandbox/launch.py``) loads this directory as a standalone package named
``_sandbox`` in a ``python -I -S`` interpreter, without the ``verifiers`` package or any
site-packages. The same files import normally as ``verifiers.sandbox.inside`` for tests
and linting. Every module is imported before a run starts, so nothing is loaded from
disk once the program's view of the filesystem is in place.
"""
