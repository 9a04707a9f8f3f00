"""The pytest plugin (``saga_events.testing``) as a user's project sees it, run by pytester."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

USER_CODE = textwrap.dedent(
    '''
    """A user's own module: code that discovers a service, with its own fallback."""
    from saga_events import SagaError


    def payment_url(saga) -> str:
        try:
            return saga.discover_service("payment").service_url
        except SagaError:
            return "http://payment.fallback:8002"
    '''
)

USER_TESTS = textwrap.dedent(
    '''
    import pytest
    from saga_events import ServiceNotFound

    from mycode import payment_url


    @pytest.fixture
    def redis_url():
        """The user's own fixture of this name must not clash with the plugin's."""
        return "redis://not-used:1/0"


    def test_fake_answers(saga_fake):
        saga_fake.add("payment", "http://10.0.0.5:8002", ["rest"])
        with saga_fake.sync_client() as saga:
            assert payment_url(saga) == "http://10.0.0.5:8002"


    def test_fake_outage_uses_the_code_fallback(saga_fake):
        saga_fake.available = False
        with saga_fake.sync_client() as saga:
            assert payment_url(saga) == "http://payment.fallback:8002"


    @pytest.mark.anyio
    async def test_fake_async_client(saga_fake):
        async with saga_fake.client() as saga:
            await saga.register_service("me", "http://127.0.0.1:9000", ["rest"])
            assert [i.service_url for i in saga_fake.instances("me")] == ["http://127.0.0.1:9000"]
        assert saga_fake.services() == {}


    def test_real_registry(saga_registry, saga_client, redis_url):
        assert redis_url == "redis://not-used:1/0"
        saga_registry.add("payment", "http://10.0.0.6:8002", ["rest"])
        assert payment_url(saga_client) == "http://10.0.0.6:8002"
        info = saga_client.register_service("me", "http://127.0.0.1:9000", ["rest"])
        assert saga_registry.wait_for("me").service_id == info.service_id


    def test_real_mirror(saga_registry, saga_mirror):
        saga_registry.add("search", "http://10.0.0.7:8080")
        assert saga_mirror.wait_for("search", 5).service_url == "http://10.0.0.7:8080"
        saga_registry.remove("search")
        with pytest.raises(ServiceNotFound):
            saga_mirror.pick("search")


    def test_rest_api(saga_registry, saga_http_url):
        import httpx
        from saga_events import SagaServiceDiscovery

        with SagaServiceDiscovery(saga_http_url) as saga:
            info = saga.register_service("rest-svc", "http://127.0.0.1:9100", ["rest"])
            assert info.source == "registry"
            answer = httpx.get(f"{saga_http_url}/api/v1/services/rest-svc").json()
            assert answer["service_id"] == info.service_id
            assert saga_registry.wait_for("rest-svc").service_url == "http://127.0.0.1:9100"
        saga_registry.wait_gone("rest-svc")


    def test_a_failing_user_test_fails(saga_fake):
        with saga_fake.sync_client() as saga:
            assert payment_url(saga) == "http://somewhere.else"
    '''
)


def test_plugin_fixtures_work_in_a_users_project(pytester: pytest.Pytester) -> None:
    """A user's tests get the saga_* fixtures from the entry point, fake and real alike."""
    pytester.makepyfile(mycode=USER_CODE, test_user=USER_TESTS)
    pytester.makeini("[pytest]\nanyio_backend = asyncio\n")
    pytester.makeconftest(
        "import pytest\n\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n"
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*test_a_failing_user_test_fails*"])


def test_plugin_lists_its_fixtures(pytester: pytest.Pytester) -> None:
    """``pytest --fixtures`` shows the plugin's fixtures with their docs."""
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    names = ("saga_fake", "saga_redis", "saga_registry", "saga_redis_url", "saga_http_url")
    for name in (*names, "saga_client"):
        result.stdout.fnmatch_lines([f"{name}*"])
    result.stdout.fnmatch_lines(["*saga_mirror*"])
