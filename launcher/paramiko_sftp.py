"""Shipping the agent over the paramiko transport: SFTP, a temp file renamed into place."""
import os
import socket

from .paramiko_transport import home_error


def ship(transport, client, blob, digest):
    import paramiko
    sftp = client.open_sftp()
    sftp.get_channel().settimeout(transport._io_timeout())
    try:
        home = transport.agent_home()
        if home.startswith("~/"):
            home = sftp.normalize(".") + "/" + home[2:]
        elif home == "~":
            home = sftp.normalize(".")
        path = "%s/agent/agent-%s.pyz" % (home, digest[:16])
        try:
            if sftp.stat(path).st_size == len(blob):
                return path
        except IOError as e:
            if isinstance(e, socket.timeout):
                raise
        tmp = "%s.tmp%d" % (path, os.getpid())
        try:
            _mkdirs(sftp, home, 0o700)
            _mkdirs(sftp, home + "/agent", 0o700)
            with sftp.open(tmp, "wb") as f:
                f.write(blob)
            sftp.chmod(tmp, 0o600)
            try:
                sftp.posix_rename(tmp, path)
            except IOError:
                sftp.rename(tmp, path)
        except (IOError, paramiko.SSHException) as e:
            if isinstance(e, socket.timeout):
                raise
            try:
                sftp.remove(tmp)
            except (IOError, paramiko.SSHException):
                pass
            raise home_error(transport, home, e, len(blob))
        return path
    finally:
        sftp.close()


def _mkdirs(sftp, path, mode):
    try:
        sftp.stat(path)
        return
    except IOError:
        pass
    try:
        sftp.mkdir(path, mode)
        sftp.chmod(path, mode)
    except IOError as e:
        try:
            sftp.stat(path)  # made by a concurrent rtrain: fine
        except IOError:
            raise e  # else the mkdir's error (permission denied...) stands, not "no such file"
