import pytest

from imgclf.contract import TUNING_NAME_MAX_LENGTH, check_name
from imgclf.errors import UserError


@pytest.mark.parametrize("name", ["a", "ep", "imgclf-20240101-120000", "A1--b2", "x" * 63])
def test_names_valid_on_sagemaker_are_accepted(name):
    assert check_name("job", name) == name


@pytest.mark.parametrize(
    "name",
    [
        "../..",
        "../../poetry",
        "../x",
        "/home/user/project",
        "a/b",
        ".",
        "",
        "-a",
        "a-",
        "a_b",
        "a.b",
        "a b",
        "x" * 64,
        "abc\n",
        "é",
    ],
)
def test_names_that_could_become_another_path_are_refused_naming_the_pattern(name):
    with pytest.raises(UserError) as exc:
        check_name("endpoint", name)
    message = str(exc.value)
    assert f"endpoint name {name!r} is not valid" in message
    assert "^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$" in message and "\n" not in message


def test_tuning_job_names_have_sagemakers_shorter_bound():
    assert check_name("tuning job", "t" * 32, max_length=TUNING_NAME_MAX_LENGTH)
    with pytest.raises(UserError, match=r"at most 32 characters.*\{0,31\}"):
        check_name("tuning job", "t" * 33, max_length=TUNING_NAME_MAX_LENGTH)
