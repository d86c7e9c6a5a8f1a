"""Real clusters on this machine for integration tests: each starts the real daemons, on
loopback, and stops them by their own handles.

- ``LocalSlurm``: MUNGE, ``slurmctld`` and ``slurmd`` (SLURM 22.05 from Debian). One node on
  127.0.0.1 with 8 declared CPUs (more than the machine has, so several 2-task steps fit) and 2
  stand-in GPUs (jobs that ask for GPUs get scheduled, and train on the CPU); or one node per
  namespace of ``TwoHosts``.
- ``SparkStandalone``: a Spark standalone master and one worker (2 cores), on 127.0.0.1.
- ``RayHead``: a Ray head with its job server, in a network namespace of ``TwoHosts`` (Ray
  advertises the machine's external address even when told 127.0.0.1), with token auth.
- ``TwoHosts``: two Linux network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2,
  each with its own loopback and nothing else: two "hosts" whose traffic cannot leave them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LocalSlurm:
    """A SLURM whose daemons this object starts and stops: one node on 127.0.0.1, or, given
    ``hosts``, one node per network namespace (its address is its node name), with
    ``slurmctld`` on the first."""

    CPUS = 8
    GPUS = 2

    def __init__(self, hosts: TwoHosts | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="ktrain-slurm-"))
        self.folder.chmod(0o755)  # the munge user must reach its socket
        self.hostname = socket.gethostname().split(".")[0]
        self.hosts = hosts
        self.nodes = list(hosts.addresses) if hosts else [self.hostname]
        self.processes: list[subprocess.Popen] = []
        self.env = {"SLURM_CONF": str(self.folder / "slurm.conf")}
        """What a client command (srun, sbatch, sinfo) needs in its environment."""

    def command(self, *args) -> list[str]:
        """A client command (srun, sbatch, ...) as run where the controller is reachable."""
        inside = ["ip", "netns", "exec", self.hosts.namespaces[0]] if self.hosts else []
        return [*inside, *map(str, args)]

    def start(self, timeout: float = 60) -> LocalSlurm:
        subprocess.run(["bash", str(REPO / "scripts" / "install_test_system.sh")],
                       check=True, capture_output=True)
        munge = self.folder / "munge"  # a file-system socket: reachable from every namespace
        munge.mkdir()
        shutil.chown(munge, "munge", "munge")
        socket_path = munge / "munge.socket"
        self._start(["munged", "--foreground", f"--socket={socket_path}",
                     f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                     f"--seed-file={munge}/munged.seed"], user="munge", group="munge")
        self._wait(socket_path.exists, timeout, "munged did not create its socket")
        (self.folder / "slurm.conf").write_text(self._config(socket_path))
        # Stand-in GPUs (no cgroups confine tasks to device files): --gpus-per-task schedules
        # and sets CUDA_VISIBLE_DEVICES; TensorFlow's CPU build then trains on the CPU.
        (self.folder / "gres.conf").write_text("Name=gpu File=/dev/null\nName=gpu File=/dev/zero\n")
        env = {**os.environ, **self.env}  # SLURM_CONF: where gres.conf is found too
        self._start(self._on(0, "slurmctld", "-D", node=False), env=env)
        for index, node in enumerate(self.nodes):
            (self.folder / f"tmp-{node}").mkdir()
            self._start(self._on(index, "slurmd", "-D", "-N", node), env=env)
        self._wait(self._idle, timeout, "the SLURM nodes did not become idle")
        return self

    def _on(self, index: int, *command: str, node: bool = True) -> list[str]:
        """A daemon's command line on node ``index``: in its namespace's network only (unlike
        ``ip netns exec``, nsenter keeps /sys, where slurmd finds the cgroup file system); a
        node's daemon (and so its tasks) has the node's own host name."""
        if not self.hosts:
            return list(command)
        return ["nsenter", f"--net=/var/run/netns/{self.hosts.namespaces[index]}",
                *(self.hosts.with_hostname(index, command) if node else command)]

    def _config(self, munge_socket: Path) -> str:
        d = self.folder
        controller = self.hosts.addresses[0] if self.hosts else "127.0.0.1"
        if self.hosts:
            nodes = [f"NodeName={a} NodeHostname={self.hostname} NodeAddr={a} CPUs=4 "
                     f"RealMemory=4000" for a in self.nodes]
        else:
            nodes = [f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.CPUS} "
                     f"RealMemory=8000 Gres=gpu:{self.GPUS}"]
        return "\n".join([
            "ClusterName=ktrain-test", f"SlurmctldHost={self.hostname}({controller})",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "SlurmUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}", f"StateSaveLocation={d}/state",
            # per node (%n): nodes share this file system, and PMIx keeps files in TmpFS
            f"SlurmdSpoolDir={d}/spool-%n", f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmdLogFile={d}/slurmd-%n.log", f"TmpFS={d}/tmp-%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmctldLogFile={d}/slurmctld.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides", "MpiDefault=none", "ReturnToService=2",
            "KillWait=10", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "GresTypes=gpu", *nodes,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
            "State=UP", ""])

    def _start(self, command: list[str], **kwargs) -> None:
        log = open(self.folder / f"{Path(command[0]).name}-{len(self.processes)}.out", "ab")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True, **kwargs))
        log.close()

    def _idle(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}; see "
                                   f"{self.folder}")
        state = subprocess.run(self.command("sinfo", "-h", "-o", "%T %D"),
                               env={**os.environ, **self.env}, capture_output=True, text=True)
        return state.stdout.strip() == f"idle {len(self.nodes)}"

    @staticmethod
    def _wait(condition, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(message)
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the daemons in reverse order of start; the folder goes with them."""
        for process in reversed(self.processes):
            stop(process)
        shutil.rmtree(self.folder, ignore_errors=True)


class TwoHosts:
    """Two network namespaces joined by a veth pair (PLATFORM.md's recipe); needs root."""

    SUBNET = "10.77.0"
    INTERFACE = "ktnet0"
    """The veth end's name inside each namespace (the same on both, as on a real cluster)."""

    _made = 0  # so that two pairs may exist at once in one test session

    def __init__(self):
        TwoHosts._made += 1
        tag = f"{os.getpid() % 100000}x{TwoHosts._made % 100}"
        self.namespaces = (f"ktns{tag}a", f"ktns{tag}b")
        self.addresses = (f"{self.SUBNET}.1", f"{self.SUBNET}.2")
        self.processes: list[subprocess.Popen] = []
        self._created: list[str] = []

    def start(self) -> TwoHosts:
        a, b = self.namespaces
        veth = (f"{a}v", f"{b}v")
        for namespace in self.namespaces:
            self._ip("netns", "add", namespace)
            self._created.append(namespace)
        self._ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for namespace, device, address in zip(self.namespaces, veth, self.addresses):
            self._ip("link", "set", device, "netns", namespace)
            self._ip("-n", namespace, "link", "set", device, "name", self.INTERFACE)
            self._ip("-n", namespace, "addr", "add", f"{address}/24", "dev", self.INTERFACE)
            self._ip("-n", namespace, "link", "set", self.INTERFACE, "up")
            self._ip("-n", namespace, "link", "set", "lo", "up")
        return self

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def run_in(self, host: int, command: list, *, env: dict, cwd: Path,
               own_hostname: bool = True) -> subprocess.Popen:
        """Start ``command`` on host 0 or 1; its output goes to a pipe the caller reads.
        ``own_hostname``: as on a real cluster, the host's name resolves to its address (else it
        is this machine's, which resolves to loopback)."""
        inside = self.with_hostname(host, command) if own_hostname else list(map(str, command))
        process = subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *inside],
                                   env=env, cwd=cwd, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def with_hostname(self, host: int, command) -> list[str]:
        """``command`` in a UTS namespace of its own whose host name is host ``host``'s address
        (unshare and sh exec, so the process keeps the pid its caller started)."""
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.addresses[host], *map(str, command)]

    def mpirun(self, folder: Path, command: list) -> list[str]:
        """Open MPI's ``mpirun`` starting one rank of ``command`` on each host, to be run on host
        0: its agent reaches host 1 by entering that host's namespace where ssh would log in."""
        agent, hostfile = folder / "enter-host.sh", folder / "hostfile"
        cases = "".join(f"  {address}) namespace={namespace} ;;\n"
                        for address, namespace in zip(self.addresses, self.namespaces))
        agent.write_text(
            '#!/bin/bash\nhost="$1"; shift\ncase "$host" in\n' + cases +
            '  *) echo "no simulated host $host" >&2; exit 1 ;;\nesac\n'
            'exec ip netns exec "$namespace" unshare --uts sh -c '
            '\'hostname "$0" && exec /bin/sh -c "$1"\' "$host" "$*"\n')
        agent.chmod(0o755)
        hostfile.write_text("".join(f"{address} slots=1\n" for address in self.addresses))
        return [str(Path(sys.executable).parent / "mpirun"), "--allow-run-as-root",
                "--hostfile", str(hostfile), "--prtemca", "plm_ssh_agent", str(agent),
                "-np", "2", *map(str, command)]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for namespace in self._created:  # removes the veth pair with it
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


class SparkStandalone:
    """A Spark standalone master and worker from the pyspark package (its ``spark-class``, in
    the foreground, so each is this object's own process), on 127.0.0.1; or, on ``hosts``, the
    master on host 0 and one worker on each host, each bound to its host's address."""

    def __init__(self, cores: int = 2, hosts: TwoHosts | None = None):
        import pyspark

        self.home = Path(pyspark.__file__).parent
        self.folder = Path(tempfile.mkdtemp(prefix="ktrain-spark-"))
        self.cores = cores
        """Per worker."""
        self.hosts = hosts
        self.addresses = hosts.addresses if hosts else ("127.0.0.1",)
        self.port = free_port()
        self.url = f"spark://{self.addresses[0]}:{self.port}"
        self.processes: list[subprocess.Popen] = []
        self.env = {"SPARK_HOME": str(self.home), "SPARK_LOG_DIR": str(self.folder),
                    "SPARK_WORKER_DIR": str(self.folder)}

    def start(self, timeout: float = 90) -> SparkStandalone:
        self._start("master", "org.apache.spark.deploy.master.Master", "--host",
                    self.addresses[0], "--port", str(self.port), "--webui-port", str(free_port()))
        for index, address in enumerate(self.addresses):
            self._start(f"worker-{index}", "org.apache.spark.deploy.worker.Worker", "--host",
                        address, "--cores", str(self.cores), "--memory", "4g", "--webui-port",
                        str(free_port()), self.url, host=index)
        for index in range(len(self.addresses)):
            self.wait_for(f"worker-{index}", "Successfully registered with master", timeout)
        return self

    def _start(self, name: str, *args: str, host: int = 0) -> None:
        command = [str(self.home / "bin" / "spark-class"), *args]
        if self.hosts:
            command = ["ip", "netns", "exec", self.hosts.namespaces[host],
                       *self.hosts.with_hostname(host, command)]
        log = open(self.folder / f"{name}.log", "ab")
        self.processes.append(subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env, "SPARK_LOCAL_IP": self.addresses[host]}))
        log.close()

    def wait_for(self, name: str, line: str, timeout: float) -> None:
        """Until process ``name``'s log shows ``line``; an error if any process exits first."""
        deadline = time.monotonic() + timeout
        while line not in self._log(name):
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[-1]} exited; see {self.folder}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no '{line}' from the Spark {name}; see {self.folder}")
            time.sleep(0.3)

    def _log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        shutil.rmtree(self.folder, ignore_errors=True)


class SparkConnectServer:
    """A Spark Connect server from the pyspark package (``spark-submit`` of its server class, in
    the foreground), running its jobs on ``local[cores]``, listening on 127.0.0.1 only."""

    def __init__(self, cores: int = 2):
        self.spark = SparkStandalone(cores)  # the same pyspark home, folder and JVM start
        self.port = free_port()
        self.url = f"sc://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> SparkConnectServer:
        spark = self.spark
        spark.env["PYSPARK_PYTHON"] = sys.executable
        spark._start("connect", "org.apache.spark.deploy.SparkSubmit",
                     "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
                     "--master", f"local[{spark.cores}]", "--name", "ktrain-test-connect",
                     *(f"--conf={key}={value}" for key, value in {
                         "spark.connect.grpc.binding.address": "127.0.0.1",
                         "spark.connect.grpc.binding.port": self.port,
                         "spark.driver.host": "127.0.0.1",
                         "spark.driver.bindAddress": "127.0.0.1",
                         "spark.ui.enabled": "false", "spark.task.maxFailures": 1}.items()))
        spark.wait_for("connect", "Spark Connect server started", timeout)
        return self

    def stop(self) -> None:
        self.spark.stop()


class RayHead:
    """``ray start --head --block`` on host 0 of ``hosts`` and a worker node on host 1 (this
    object's own processes; each node's raylet, GCS and workers are in its process group),
    with a token that clients need."""

    PORT, JOBS_PORT = 6380, 8265
    MARKER = Path("/tmp/ray/ray_current_cluster")  # where Ray records the cluster it started

    def __init__(self, hosts: TwoHosts):
        import secrets

        self.hosts = hosts
        self.address = f"{hosts.addresses[0]}:{self.PORT}"
        self.jobs_url = f"http://{hosts.addresses[0]}:{self.JOBS_PORT}"
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        """What a client (ray job submit) needs in its environment."""
        self.processes: list[subprocess.Popen] = []
        self.node: subprocess.Popen | None = None
        """The worker node's ``ray start``."""
        self.node_folder = tempfile.mkdtemp(prefix="ktrain-ray-node-")

    def command(self, *args) -> list[str]:
        """A client command, run where the head is reachable."""
        return ["ip", "netns", "exec", self.hosts.namespaces[0], *map(str, args)]

    def start(self, timeout: float = 120) -> RayHead:
        bin_dir = Path(sys.executable).parent  # ray, and ktrain for the jobs' entrypoints
        ray = bin_dir / "ray"
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        head, node = self.hosts.addresses
        self._start(0, ray, "start", "--head", f"--port={self.PORT}", "--num-cpus=4",
                    f"--dashboard-host={head}", f"--dashboard-port={self.JOBS_PORT}")
        deadline = time.monotonic() + timeout
        while subprocess.run(self.command(ray, "job", "list", "--address", self.jobs_url),
                             env={**os.environ, **self.env}, capture_output=True).returncode:
            self._check(deadline, "the Ray head did not start")
        self.add_node(timeout=max(1.0, deadline - time.monotonic()))
        return self

    def add_node(self, timeout: float = 120) -> None:
        """Start the worker node on host 1 (2 CPUs), once more after ``kill_node``."""
        ray = Path(sys.executable).parent / "ray"
        # A temporary folder of its own, as on another machine: Ray's files for the job (its
        # working directory among them) would be the head's, and go when this node dies.
        self._start(1, ray, "start", f"--address={self.address}", "--num-cpus=2",
                    f"--temp-dir={self.node_folder}")
        self.node = self.processes[-1]
        deadline = time.monotonic() + timeout
        while "2 node(s)" not in self._status(ray):
            self._check(deadline, "the Ray worker node did not join")

    def kill_node(self) -> None:
        """SIGKILL every process on the worker node's host (its raylet, and the actors Ray
        started in sessions of their own), at once, as a machine lost."""
        pids = subprocess.run(["ip", "netns", "pids", self.hosts.namespaces[1]],
                              capture_output=True, text=True, check=True).stdout.split()
        for pid in map(int, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.node.wait()

    def _start(self, host: int, ray: Path, *args: str) -> None:
        """``ray start ... --block`` on ``host``, with that host's name and address."""
        command = [ray, *args, "--block", "--disable-usage-stats",
                   f"--node-ip-address={self.hosts.addresses[host]}"]
        self.processes.append(subprocess.Popen(
            ["ip", "netns", "exec", self.hosts.namespaces[host],
             *self.hosts.with_hostname(host, command)],
            env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))

    def _status(self, ray: Path) -> str:
        """How many nodes are alive, in words ("2 node(s)")."""
        probe = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()), 'node(s)')")
        return subprocess.run(self.command(Path(ray).parent / "python", "-c", probe),
                              env={**os.environ, **self.env, "RAY_ADDRESS": self.address},
                              capture_output=True, text=True).stdout

    def _check(self, deadline: float, problem: str) -> None:
        if any(p.poll() is not None for p in (self.processes[0], self.processes[-1])) or \
                time.monotonic() > deadline:  # the head, or the node starting
            raise RuntimeError(problem)
        time.sleep(1)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self.MARKER.exists() and self.MARKER.read_text().strip() == self.address:
            self.MARKER.unlink()  # what the killed head left behind
        shutil.rmtree(self.node_folder, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and an artifacts folder of its own,
    in its own process group (its web server's workers are children)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="ktrain-mlflow-"))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        import urllib.request

        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1",
             "--port", port, "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder}/store.db",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=open(self.folder / "server.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n"
                                       + (self.folder / "server.log").read_text()[-3000:])
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            with contextlib.suppress(ProcessLookupError):  # its workers, if any outlived it
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)
