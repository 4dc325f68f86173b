"""The INI configuration: Cinder's option names, defaults under $IVCACHE_HOME, one clear
error naming the option for anything wrong."""

from __future__ import annotations

import socket
from pathlib import Path

import attrs
import pytest
from sqlalchemy import URL

from ivcache.core.errors import ConfigError
from ivcache.core.model import InternalTenant
from ivcache.core.policy import CachePolicy
from ivcache.entrypoints.config import OPTIONS, Config, GlanceConfig, Where, load_config


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "etc" / "ivcache.ini"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={"IVCACHE_HOME": str(tmp_path / "home")})


def _refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, text)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_without_a_file_everything_lives_under_ivcache_home(tmp_path: Path) -> None:
    config = load_config(env={"IVCACHE_HOME": str(tmp_path)})
    assert config.home == tmp_path and config.source is None
    assert config.database_url.render_as_string() == f"sqlite:///{tmp_path / 'ivcache.db'}"
    assert config.backend().storage_path == tmp_path / "volumes"
    assert config.images_path == tmp_path / "images"
    assert config.host == socket.gethostname()
    backend = config.backend()
    assert (backend.storage, config.image_source, config.notifier) == ("file", "local", "log")
    assert backend.storage_capacity_gb == 1000
    assert backend.policy == CachePolicy()
    assert config.tenant == InternalTenant()
    assert config.glance == GlanceConfig()
    assert (config.backend().rbd_pool, config.backend().rbd_conf, config.backend().rbd_user,
            config.backend().rbd_max_clone_depth) == ("rbd", "/etc/ceph/ceph.conf", "", 5)


def test_ivcache_config_names_the_file_when_no_path_is_given(tmp_path: Path) -> None:
    path = tmp_path / "from-env.ini"
    path.write_text("[DEFAULT]\nhost = env-host\n", encoding="utf-8")
    config = load_config(env={"IVCACHE_CONFIG": str(path), "IVCACHE_HOME": str(tmp_path)})
    assert config.host == "env-host" and config.source == path


def test_a_cinder_default_section_sets_the_policy_and_the_internal_tenant(
        tmp_path: Path) -> None:
    config = _load(tmp_path, """[DEFAULT]
host = node-1
cinder_internal_tenant_project_id = svc-project
cinder_internal_tenant_user_id = svc-user
image_volume_cache_enabled = False
image_volume_cache_max_size_gb = 200
image_volume_cache_max_count = 50
volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver
[ivcache]
internal_tenant_quota_gb = 300
internal_tenant_quota_volumes = 60
claim_wait_seconds = 1.5
claim_lease_seconds = 90
""")
    assert config.host == "node-1"
    # The deprecated claim_lease_seconds: a dead machine's claim lapses after as long.
    assert config.backend().policy == CachePolicy(enabled=False, max_size_gb=200, max_count=50,
                                        claim_wait_seconds=1.5, claim_heartbeat_seconds=30.0)
    assert config.tenant == InternalTenant("svc-project", "svc-user", quota_gb=300,
                                           quota_volumes=60)


def test_max_size_count_is_read_as_max_count_and_max_count_wins(tmp_path: Path) -> None:
    alias = "[DEFAULT]\nimage_volume_cache_max_size_count = 7\n"
    assert _load(tmp_path, alias).backend().policy.max_count == 7
    both = alias + "image_volume_cache_max_count = 3\n"
    assert _load(tmp_path, both).backend().policy.max_count == 3


def test_the_cache_options_come_from_the_backend_section_when_one_is_named(
        tmp_path: Path) -> None:
    config = _load(tmp_path, """[DEFAULT]
image_volume_cache_max_count = 50
image_volume_cache_max_size_gb = 10
[ivcache]
backend = lvm-1
[lvm-1]
volume_backend_name = LVM
image_volume_cache_max_count = 4
""")
    # The backend's own value wins; what it does not set falls back to [DEFAULT].
    assert (config.backend().policy.max_count, config.backend().policy.max_size_gb) == (4, 10)
    message = _refused(tmp_path, "[ivcache]\nbackend = lvm-2\n")
    assert "backend = 'lvm-2' names no section" in message


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = _load(tmp_path, """[ivcache]
storage_path = vols
images_path = ../images
database_url = sqlite:///db/cache.db
""")
    etc = tmp_path / "etc"
    assert config.backend().storage_path == etc / "vols"
    assert config.images_path == etc / ".." / "images"
    assert config.database_url.database == str(etc / "db" / "cache.db")
    default = _load(tmp_path, "[ivcache]\n")
    assert default.backend().storage_path == etc / "volumes"
    assert default.database_url.database == str(etc / "ivcache.db")


def test_absolute_and_in_memory_and_server_database_urls_are_kept(tmp_path: Path) -> None:
    absolute = _load(tmp_path, "[ivcache]\ndatabase_url = sqlite:////var/lib/x.db\n")
    assert absolute.database_url.database == "/var/lib/x.db"
    memory = _load(tmp_path, "[ivcache]\ndatabase_url = sqlite:///:memory:\n")
    assert memory.database_url.database == ":memory:"
    pg = _load(tmp_path, "[ivcache]\n"
                         "database_url = postgresql+psycopg://u:secret@db.example/ivc\n")
    assert pg.database_url.render_as_string(hide_password=False) == (
        "postgresql+psycopg://u:secret@db.example/ivc")


def test_a_database_url_that_is_no_url_is_refused_naming_the_option(tmp_path: Path) -> None:
    message = _refused(tmp_path, "[ivcache]\ndatabase_url = postgres//u:secret@db/ivc\n")
    assert "option database_url is not a database URL" in message
    assert "secret" not in message
    message = _refused(tmp_path, "[ivcache]\ndatabase_url = oracle9://u:secret@db/ivc\n")
    assert "option database_url is not a database URL" in message and "oracle9" in message
    assert "secret" not in message


def test_the_sqlite_file_is_known_once_parsed(tmp_path: Path) -> None:
    config = _load(tmp_path, "[ivcache]\ndatabase_url = sqlite:///db/cache.db\n")
    assert config.sqlite_path == tmp_path / "etc" / "db" / "cache.db"
    for url in ("sqlite://", "sqlite:///:memory:", "postgresql+psycopg://u@db/ivc"):
        assert attrs.evolve(config, database_url=url).sqlite_path is None


def test_an_empty_value_means_the_default(tmp_path: Path) -> None:
    config = _load(tmp_path, "[DEFAULT]\nhost =\nimage_volume_cache_max_count =\n"
                             "[ivcache]\nstorage =\nstorage_path =\n")
    assert config.host == socket.gethostname() and config.backend().policy.max_count == 0
    backend = config.backend()
    assert backend.storage == "file" and backend.storage_path == tmp_path / "etc" / "volumes"


def test_glance_options(tmp_path: Path) -> None:
    config = _load(tmp_path, """[ivcache]
image_source = glance
[glance]
url = http://glance.example:9292
auth = trusted-headers
insecure = yes
cafile = /etc/ssl/ca.pem
connect_timeout = 2.5
read_timeout = 30
retries = 0
""")
    assert config.image_source == "glance"
    assert config.glance == GlanceConfig(url="http://glance.example:9292",
                                         auth="trusted-headers", insecure=True,
                                         cafile="/etc/ssl/ca.pem", connect_timeout=2.5,
                                         read_timeout=30.0, retries=0)


def test_the_rbd_and_storage_options(tmp_path: Path) -> None:
    config = _load(tmp_path, """[ivcache]
storage = fake-rbd
storage_capacity_gb = 20
notifier = none
rbd_pool = volumes
rbd_conf = /etc/ceph/other.conf
rbd_user = cinder
rbd_max_clone_depth = 2
""")
    assert (config.backend().storage, config.backend().storage_capacity_gb, config.notifier) == (
        "fake-rbd", 20, "none")
    backend = config.backend()
    assert (backend.rbd_pool, backend.rbd_conf, backend.rbd_user,
            backend.rbd_max_clone_depth) == ("volumes", "/etc/ceph/other.conf", "cinder", 2)


@pytest.mark.parametrize(("text", "expected"), [
    ("[DEFAULT]\nimage_volume_cache_max_count = lots\n",
     "option image_volume_cache_max_count = 'lots' is not a whole number"),
    ("[DEFAULT]\nimage_volume_cache_max_size_count = 1.5\n",
     "option image_volume_cache_max_size_count = '1.5' is not a whole number"),
    ("[DEFAULT]\nimage_volume_cache_max_size_gb = -1\n",
     "option image_volume_cache_max_size_gb = -1 must be 0 or more"),
    ("[DEFAULT]\nimage_volume_cache_enabled = maybe\n",
     "option image_volume_cache_enabled = 'maybe' is not true or false"),
    ("[ivcache]\nclaim_wait_seconds = soon\n",
     "option claim_wait_seconds = 'soon' is not a number"),
    ("[ivcache]\nclaim_lease_seconds = -0.5\n",
     "option claim_lease_seconds = -0.5 must be 0 or more"),
    ("[ivcache]\nstorage = tape\n",
     "option storage = 'tape' is not one of file, qcow2, rbd, fake-lvm, fake-rbd"),
    ("[ivcache]\nimage_source = ftp\n", "option image_source = 'ftp' is not one of local, glance"),
    ("[ivcache]\nnotifier = email\n",
     "option notifier = 'email' is not one of log, otel, messaging, none"),
    ("[glance]\nauth = password\n",
     "option auth = 'password' is not one of keystone, trusted-headers"),
    ("[glance]\nretries = -3\n", "option retries = -3 must be 0 or more"),
    ("[DEFAULT]\nimage_volume_cache_eviction_policy = lfu\n",
     "option image_volume_cache_eviction_policy = 'lfu' is not one of lru, gdsf"),
])
def test_a_bad_value_is_refused_naming_the_option(tmp_path: Path, text: str,
                                                  expected: str) -> None:
    message = _refused(tmp_path, text)
    assert message == f"{tmp_path / 'etc' / 'ivcache.ini'}: {expected}"


def test_an_unknown_option_is_refused_in_ivcache_and_glance_only(tmp_path: Path) -> None:
    message = _refused(tmp_path, "[ivcache]\nstorgae = file\n")
    assert "unknown option 'storgae' in [ivcache]; known: " in message
    assert "storage, storage_capacity_gb, storage_path" in message
    message = _refused(tmp_path, "[glance]\nendpoint = http://x\n")
    assert "unknown option 'endpoint' in [glance]; known: auth, cafile," in message
    # Cinder's own options in [DEFAULT] or a backend section are the driver's business.
    config = _load(tmp_path, "[DEFAULT]\nvolume_driver = x\nenabled_backends = lvm\n"
                             "[ivcache]\nbackend = lvm\n[lvm]\nvolume_group = vg\n")
    assert config.backend().storage == "file"


def test_an_unreadable_or_invalid_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.ini"):
        load_config(tmp_path / "missing.ini", env={})
    message = _refused(tmp_path, "host = no-section\n")
    assert "is not valid INI" in message


def test_every_option_is_named_once_and_its_default_has_its_type() -> None:
    names = [name for o in OPTIONS for name in o.names]
    assert len(names) == len(set(names))
    for option in OPTIONS:
        expected = str if option.type is URL else option.type
        assert isinstance(option.default, expected), option
        assert isinstance(option.default, bool) == (option.type is bool), option
        assert not option.choices or option.default in option.choices, option


def test_the_unknown_option_check_knows_every_option_of_the_table(tmp_path: Path) -> None:
    # Without enabled_backends, the storage options are [ivcache]'s too.
    sections = {Where.IVCACHE: "ivcache", Where.STORAGE: "ivcache", Where.GLANCE: "glance"}
    for where, section in sections.items():
        lines = [f"{o.name} =" for o in OPTIONS if o.where is where]
        _load(tmp_path, f"[{section}]\n" + "\n".join(lines) + "\n")


# -- several backends (enabled_backends) --------------------------------------------------------

MULTI = """[DEFAULT]
host = node-1
cluster = ceph-a                    ; optional: hosts with the same cluster share entries
enabled_backends = fast, bulk
cinder_internal_tenant_project_id = internal
cinder_internal_tenant_user_id = internal
image_volume_cache_max_size_gb = 100

[fast]
volume_backend_name = fast
volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver
storage = file
storage_path = /srv/fast
image_volume_cache_enabled = true
image_volume_cache_max_count = 20

[bulk]
volume_backend_name = bulk
storage = rbd
rbd_pool = volumes
rbd_ceph_conf = /etc/ceph/cinder.conf
image_volume_cache_max_size_gb = 500
"""


def test_each_backend_section_has_its_own_cache_and_storage_options(tmp_path: Path) -> None:
    config = _load(tmp_path, MULTI)
    assert config.backend_names == ["fast", "bulk"] and config.default_backend == ""
    fast, bulk = config.backend("fast"), config.backend("bulk")
    assert (fast.storage, fast.storage_path, fast.pool) == ("file", Path("/srv/fast"), "fast")
    assert (fast.policy.max_count, fast.policy.max_size_gb) == (20, 100)  # [DEFAULT]'s
    assert (bulk.storage, bulk.rbd_pool, bulk.pool) == ("rbd", "volumes", "volumes")
    assert bulk.rbd_conf == "/etc/ceph/cinder.conf"  # Cinder's name, rbd_ceph_conf
    assert (bulk.policy.max_count, bulk.policy.max_size_gb) == (0, 500)
    assert config.cluster == "ceph-a"
    assert config.scope(fast).key == "ceph-a@fast#fast"
    assert config.scope(bulk).key == "ceph-a@bulk#volumes"
    with pytest.raises(ConfigError, match=r"several backends are enabled \(fast, bulk\)"):
        config.backend()


def test_the_eviction_policy_is_lru_unless_a_backend_or_default_says_gdsf(
        tmp_path: Path) -> None:
    config = _load(tmp_path, MULTI)
    assert config.backend("fast").policy.eviction_policy == "lru"  # Cinder's
    gdsf_for_bulk = MULTI.replace("[bulk]\n", "[bulk]\nimage_volume_cache_eviction_policy = gdsf\n")
    config = _load(tmp_path, gdsf_for_bulk)
    assert config.backend("bulk").policy.eviction_policy == "gdsf"
    assert config.backend("fast").policy.eviction_policy == "lru"
    everywhere = MULTI.replace("[DEFAULT]\n",
                               "[DEFAULT]\nimage_volume_cache_eviction_policy = gdsf\n")
    assert {_load(tmp_path, everywhere).backend(b).policy.eviction_policy
            for b in ("fast", "bulk")} == {"gdsf"}
    refused = _refused(tmp_path, MULTI.replace(
        "[fast]\n", "[fast]\nimage_volume_cache_eviction_policy = LRU\n"))
    assert refused.endswith("option image_volume_cache_eviction_policy = 'LRU' is not one of "
                            "lru, gdsf")


def test_without_enabled_backends_there_is_one_implicit_backend_named_default(
        tmp_path: Path) -> None:
    config = _load(tmp_path, "[DEFAULT]\nhost = node-1\n")
    assert config.backend_names == ["default"] and config.backend().name == "default"
    assert config.scope(config.backend()).key == "node-1@default#default"
    rbd = _load(tmp_path, "[ivcache]\nstorage = rbd\nrbd_pool = volumes\n")
    assert rbd.backend().pool == "volumes"
    named = _load(tmp_path, "[DEFAULT]\npool_name = gold\n[ivcache]\n")
    assert named.backend().pool == "gold"


def test_a_backend_without_storage_path_gets_its_own_directory(tmp_path: Path) -> None:
    config = _load(tmp_path, "[DEFAULT]\nenabled_backends = a, b\n[ivcache]\nbackend = b\n"
                             "[a]\n[b]\n")
    etc = tmp_path / "etc"
    assert [b.storage_path for b in config.backends] == [etc / "volumes" / "a",
                                                         etc / "volumes" / "b"]
    assert config.backend().name == "b"


@pytest.mark.parametrize(("text", "expected"), [
    ("[DEFAULT]\nenabled_backends = fast, bulk\n[fast]\n",
     "enabled_backends names [bulk], which is not a section of the file"),
    ("[DEFAULT]\nenabled_backends = a, b\n[a]\nstorage_path = /srv/x\n[b]\nstorage_path = /srv/x\n",
     "backends a and b both claim storage_path = /srv/x"),
    ("[DEFAULT]\nenabled_backends = a, b\nstorage_path = /srv/x\n[a]\n[b]\n",
     "backends a and b both claim storage_path = /srv/x"),
    ("[DEFAULT]\ncluster = ceph@a\n", "cluster name 'ceph@a' cannot be part of a scope"),
    ("[DEFAULT]\ncluster = ceph#a\nenabled_backends = a\n[a]\n",
     "cluster name 'ceph#a' cannot be part of a scope"),
    ("[DEFAULT]\nenabled_backends = a\n[a]\ndatabase_url = sqlite:///x.db\n",
     "option database_url in [a] is global, not a backend's: put it in [ivcache]"),
    ("[DEFAULT]\nenabled_backends = a\n[a]\nhost = node-2\n",
     "option host in [a] is global, not a backend's: put it in [DEFAULT]"),
    ("[DEFAULT]\nenabled_backends = a\n[ivcache]\nstorage_path = /srv/x\n[a]\n",
     "option storage_path does not belong in [ivcache]: put it in a backend section"),
    ("[ivcache]\nimage_volume_cache_max_count = 3\n",
     "option image_volume_cache_max_count does not belong in [ivcache]: put it in [DEFAULT]"),
    ("[DEFAULT]\nenabled_backends = a\n[ivcache]\nbackend = b\n[a]\n",
     "option backend = 'b' in [ivcache] is not one of enabled_backends (a)"),
    ("[DEFAULT]\nenabled_backends = a, a\n[a]\n", "enabled_backends names [a] twice"),
])
def test_a_bad_backend_configuration_is_refused_naming_what_is_wrong(
        tmp_path: Path, text: str, expected: str) -> None:
    message = _refused(tmp_path, text)
    assert expected in message, message
    assert not (tmp_path / "etc" / "volumes").exists()  # nothing made


def test_the_deprecated_claim_lease_seconds_is_a_third_heartbeat_and_warned_of_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _load(tmp_path, "[ivcache]\nclaim_lease_seconds = 60\n")
    assert config.backend().policy.claim_heartbeat_seconds == 20.0
    _load(tmp_path, "[ivcache]\nclaim_lease_seconds = 60\n")  # read again: no second word
    warned = [r.getMessage() for r in caplog.records if "claim_lease_seconds" in r.getMessage()]
    assert len(warned) == 1 and "deprecated" in warned[0]
    (tmp_path / "b").mkdir()
    both = _load(tmp_path / "b", "[ivcache]\nclaim_lease_seconds = 60\n"
                                 "claim_heartbeat_seconds = 2\n")
    assert both.backend().policy.claim_heartbeat_seconds == 2.0
