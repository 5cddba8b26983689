"""Stand-in for the pip bootstrap script that ``ansible-test`` downloads for its sanity venvs.

This machine reaches package registries only, so ``ansible-test`` cannot fetch its bootstrap
script. ``scripts/sanity`` installs this file in the bootstrap cache instead: it gives the
fresh venv pip with ``ensurepip`` and then installs the requested packages with that pip.
Arguments are those ``ansible-test`` passes to the real script.
"""
import subprocess
import sys

GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}


def main(argv):
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"])
    args = [a for a in argv if a not in GET_PIP_ONLY]
    packages = [a for a in args if not a.startswith("-")]
    if packages:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet"] + args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
