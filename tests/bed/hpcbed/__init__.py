"""The test bed's parts, one module per component; ``tests/bed/bedlib.py`` puts them together as ``Bed``.

``core`` (names, addresses, users, running a command inside a host, daemons, health records), ``install``
(the Debian packages and the venv), ``network`` (namespaces, the bridge, veths, addresses, hostnames,
/etc/hosts), ``sshd`` (users' keys, host keys, one sshd per host), ``slurm`` (munge, slurmctld, slurmd,
node loss; the PBS commands are Slurm's torque wrappers, so they come up with it), ``sge`` (Son of Grid
Engine) and ``playbooks`` (the installed collection, the inventory, ansible-playbook inside a host).
Each component is a mixin class of ``Bed``; ``bedlib`` keeps the orchestration (up, down, health).
"""
