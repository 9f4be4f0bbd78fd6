"""Dataset downloads against a local HTTP server (no internet): a good download, resume of
a partial file (HTTP Range), a dropped connection, a wrong MD5, HTTP / network errors,
unknown names, the `data.download` config path, and the real archives when present."""
import hashlib
import http.server
import pathlib
import socket
import threading

import numpy as np
import pytest

from data_writers import write_idx_dataset
from lipnorm.data import LoadRequest, clear_cache, get_dataset, load_splits
from lipnorm.data import download as dl
from lipnorm.data.__main__ import main as cli_main
from lipnorm.registry import Registry

IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files` ({url path: bytes}) with Range support; `server.drop_after`
  closes the connection after that many body bytes (Content-Length still announces all)."""

  def do_GET(self):  # noqa: N802
    srv = self.server
    srv.requests.append((self.path, self.headers.get("Range")))
    data = srv.files.get(self.path)
    if data is None:
      self.send_error(404, "Not Found")
      return
    start, rng = 0, self.headers.get("Range")
    if rng and srv.honor_range:
      start = int(rng.split("=")[1].split("-")[0])
      if start >= len(data):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if srv.drop_after is not None:
      self.wfile.write(body[:srv.drop_after])
      self.wfile.flush()
      self.close_connection = True
      self.connection.shutdown(socket.SHUT_RDWR)
      return
    self.wfile.write(body)
    srv.bytes_sent += len(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.files, srv.requests, srv.drop_after, srv.honor_range, srv.bytes_sent = {}, [], None, True, 0
  srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()


@pytest.fixture
def blob(server):
  """A 300 kB random file served at /blob.bin and its RemoteFile entry."""
  data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
  server.files["/blob.bin"] = data
  remote = dl.RemoteFile("blob.bin", (server.url + "/blob.bin",), hashlib.md5(data).hexdigest())
  return data, remote


def test_good_download(blob, tmp_path):
  data, remote = blob
  path = dl.fetch(remote, tmp_path, progress=False)
  assert path == tmp_path / "blob.bin" and path.read_bytes() == data
  assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]   # no .part left


def test_partial_file_is_resumed_with_a_range_request(blob, server, tmp_path):
  data, remote = blob
  (tmp_path / "blob.bin.part").write_bytes(data[:100_000])
  dl.fetch(remote, tmp_path, progress=False)
  assert (tmp_path / "blob.bin").read_bytes() == data
  assert server.requests == [("/blob.bin", "bytes=100000-")]
  assert server.bytes_sent == len(data) - 100_000


def test_dropped_connection_keeps_the_part_and_a_rerun_resumes(blob, server, tmp_path):
  data, remote = blob
  server.drop_after = 70_000
  with pytest.raises(dl.DownloadError) as info:
    dl.fetch(remote, tmp_path, progress=False)
  msg = str(info.value)
  assert "\n" not in msg and "blob.bin" in msg and "rerun to resume" in msg
  assert "70000" in msg
  assert (tmp_path / "blob.bin.part").stat().st_size == 70_000
  assert not (tmp_path / "blob.bin").exists()
  server.drop_after = None
  dl.fetch(remote, tmp_path, progress=False)
  assert (tmp_path / "blob.bin").read_bytes() == data
  assert server.requests[-1] == ("/blob.bin", "bytes=70000-")


def test_server_ignoring_range_starts_over(blob, server, tmp_path):
  data, remote = blob
  server.honor_range = False
  (tmp_path / "blob.bin.part").write_bytes(b"x" * 1000)   # would corrupt an append
  dl.fetch(remote, tmp_path, progress=False)
  assert (tmp_path / "blob.bin").read_bytes() == data


def test_complete_part_file_is_checked_and_renamed(blob, server, tmp_path):
  data, remote = blob
  (tmp_path / "blob.bin.part").write_bytes(data)          # the server answers 416
  dl.fetch(remote, tmp_path, progress=False)
  assert (tmp_path / "blob.bin").read_bytes() == data and server.bytes_sent == 0


def test_wrong_checksum_names_file_expected_and_got(blob, tmp_path):
  data, remote = blob
  bad = dl.RemoteFile(remote.name, remote.urls, "0" * 32)
  with pytest.raises(dl.DownloadError) as info:
    dl.fetch(bad, tmp_path, progress=False)
  msg = str(info.value)
  assert "\n" not in msg
  assert (f"blob.bin: MD5 mismatch (expected {'0' * 32}, got "
          f"{hashlib.md5(data).hexdigest()})") in msg
  assert list(tmp_path.iterdir()) == []                    # nothing unchecked left behind


def test_existing_file_is_checked_never_replaced(blob, server, tmp_path):
  data, remote = blob
  (tmp_path / "blob.bin").write_bytes(data)
  dl.fetch(remote, tmp_path, progress=False)
  assert server.requests == []
  (tmp_path / "blob.bin").write_bytes(b"other")
  with pytest.raises(dl.DownloadError, match=r"blob.bin exists but its MD5 is .*move it away"):
    dl.fetch(remote, tmp_path, progress=False)
  assert (tmp_path / "blob.bin").read_bytes() == b"other"


def test_http_and_network_errors_are_one_line_and_mirrors_are_tried(blob, server, tmp_path):
  data, remote = blob
  missing = dl.RemoteFile("blob.bin", (server.url + "/nope.bin",), remote.md5)
  with pytest.raises(dl.DownloadError, match=r"cannot download blob.bin: .*nope.bin: HTTP 404"):
    dl.fetch(missing, tmp_path, progress=False)
  with socket.socket() as s:   # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/blob.bin"
  with pytest.raises(dl.DownloadError) as info:
    dl.fetch(dl.RemoteFile("blob.bin", (dead,), remote.md5), tmp_path, progress=False)
  assert "\n" not in str(info.value) and dead in str(info.value)
  fallback = dl.RemoteFile("blob.bin", (dead, server.url + "/blob.bin"), remote.md5)
  assert dl.fetch(fallback, tmp_path, progress=False).read_bytes() == data


def test_unknown_name_lists_valid_names(tmp_path, capsys):
  with pytest.raises(ValueError, match=r"unknown downloadable dataset 'cifar11'; valid names: "
                     r"cifar10, cifar100, fashion_mnist, mnist"):
    dl.download("cifar11", str(tmp_path))
  assert cli_main(["download", "cifar11", "--data_dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: unknown downloadable dataset 'cifar11'")
  assert list(tmp_path.iterdir()) == []


def test_official_table_covers_every_local_source():
  """Every dataset with a local loader can be downloaded, from https/http URLs with MD5s."""
  assert dl.downloadable_names() == ["cifar10", "cifar100", "fashion_mnist", "mnist"]
  for name in dl.downloadable_names():
    for remote in dl.DOWNLOADS.get(name).files:
      assert len(remote.md5) == 32 and int(remote.md5, 16) >= 0
      assert remote.urls and all(u.startswith(("https://", "http://")) and
                                 u.endswith("/" + remote.name) for u in remote.urls)
  assert dl.DOWNLOADS.get("cifar10").files[0].urls[0] == (
      "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz")


def _fake_mnist(server, tmp_path, monkeypatch):
  """Synthetic IDX files served at /mnist/, registered as the 'mnist' download."""
  rng = np.random.default_rng(1)
  src = write_idx_dataset(tmp_path / "src", (rng.integers(0, 256, (40, 28, 28)),
                                              rng.integers(0, 10, 40)),
                          (rng.integers(0, 256, (16, 28, 28)), rng.integers(0, 10, 16)))
  files = []
  for name in IDX_NAMES:
    data = (src / name).read_bytes()
    server.files[f"/mnist/{name}"] = data
    files.append(dl.RemoteFile(name, (f"{server.url}/mnist/{name}",),
                               hashlib.md5(data).hexdigest()))
  fake = Registry("downloadable dataset")
  fake.register("mnist")(dl.Downloadable("mnist", tuple(files)))
  monkeypatch.setattr(dl, "DOWNLOADS", fake)


def test_config_download_flag_fetches_missing_files(server, tmp_path, monkeypatch):
  _fake_mnist(server, tmp_path, monkeypatch)
  clear_cache()
  data_config = {"source": "mnist", "data_dir": str(tmp_path / "data"), "batch_size": 8}
  with pytest.raises(ValueError, match=r"not found offline(.|\n)*python -m lipnorm.data "
                     r"download mnist"):
    get_dataset(data_config, seed=0, num_local_devices=1, process_index=0, process_count=1)
  assert server.requests == []                       # offline is the default
  ds = get_dataset({**data_config, "download": True}, seed=0, num_local_devices=1,
                   process_index=0, process_count=1)
  assert ds.info.num_train == 40 and ds.info.num_test == 16
  assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(IDX_NAMES)
  n = len(server.requests)
  clear_cache()
  get_dataset({**data_config, "download": True}, seed=0, num_local_devices=1,
              process_index=0, process_count=1)
  assert len(server.requests) == n                   # present files are not fetched again


def test_download_dir_is_one_the_loaders_search(tmp_path, monkeypatch):
  from lipnorm.data import locations
  assert locations.download_dir("mnist", str(tmp_path)) == tmp_path / "mnist"
  monkeypatch.setenv(locations.ENV_VAR, str(tmp_path / "env"))
  assert locations.download_dir("mnist", None) == tmp_path / "env" / "mnist"
  assert locations.download_dir("mnist", None) in locations.candidate_dirs("mnist", None)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_idx_files_through_a_mirror_match_the_published_md5(shared_data, server,
                                                                 tmp_path, name):
  for path in (shared_data / name).iterdir():
    server.files[f"/{name}/{path.name}"] = path.read_bytes()
  folder = dl.download(name, str(tmp_path), mirror=f"{server.url}/{name}", progress=False)
  assert folder == tmp_path / name
  clear_cache()
  splits = load_splits(name, LoadRequest(data_dir=str(tmp_path)))
  assert splits.train_images.shape == (60000, 28, 28, 1)


@pytest.mark.slow
def test_real_cifar10_archive_with_its_local_md5(shared_data, server, tmp_path, monkeypatch):
  """The CIFAR-10 archive under ../shared/data is a reassembled copy (its MD5 is in
  MD5SUMS, not the published one): served with that MD5 it downloads and resumes."""
  md5s = dict(reversed(line.split()) for line in
              (shared_data / "MD5SUMS").read_text().splitlines() if line.strip())
  archive = "cifar-10-binary.tar.gz"
  data = (shared_data / "cifar10" / archive).read_bytes()
  server.files[f"/{archive}"] = data
  fake = Registry("downloadable dataset")
  fake.register("cifar10")(dl.Downloadable("cifar10", (dl.RemoteFile(
      archive, (f"{server.url}/{archive}",), md5s[f"cifar10/{archive}"]),)))
  monkeypatch.setattr(dl, "DOWNLOADS", fake)
  (tmp_path / "cifar10").mkdir()
  (tmp_path / "cifar10" / (archive + ".part")).write_bytes(data[:len(data) // 3])
  dl.download("cifar10", str(tmp_path), progress=False)
  assert server.requests == [(f"/{archive}", f"bytes={len(data) // 3}-")]
  # The resumed file is the archive, byte for byte; test_data_real.py loads that archive.
  assert (tmp_path / "cifar10" / archive).read_bytes() == data


def test_download_flag_is_not_a_config_change_of_a_workdir():
  """Turning `data.download` on (or a workdir written before the field existed) does not
  make a rerun refuse the workdir."""
  from lipnorm.training.workdir import config_differences
  old = {"data": {"source": "cifar10", "batch_size": 128}}
  assert config_differences(old, {"data": {**old["data"], "download": True}}) == []
  assert config_differences(old, {"data": {**old["data"], "batch_size": 64}}) == [
      "data.batch_size: 128 -> 64"]
