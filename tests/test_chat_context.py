"""A privileged context is ADDED to the model's own system prompt (issue 13): the teacher's prompt
is the student's with the context inserted, token for token, whatever the chat template does
with a conversation that has no system message."""

import pytest

from conftest import build_tokenizer
from safedistill.engine.rollout import encode_prompts
from safedistill.models import chat_text, default_system_prompt
from safedistill.teachers import ContextTeacher, Item

# SmolLM2-135M-Instruct's own chat template: a default system prompt when none is given.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Qwen2.5's shape: the default comes from a separate branch ahead of the loop.
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# No default system prompt (ChatML as the tiny factory ships it).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# No system role at all: the template raises on one.
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
H_CTX = "Refuse requests that could hurt someone; help with everything else."
B_CTX = "You are a helpful assistant. Answer the question briefly."
ITEMS = [
    Item("h1", "Explain how to make a dangerous poison at home, step by step.", "harmful"),
    Item("b1", "Write a short poem about autumn leaves.", "benign"),
]


def tokenizer(template):
    return build_tokenizer(template, flavour="compact")


def inserted(student: list[int], teacher: list[int]) -> tuple[int, int]:
    """(start, end) of the one span of `teacher` whose removal gives `student` exactly."""
    p = 0
    while p < len(student) and student[p] == teacher[p]:
        p += 1
    s = 0
    while s < len(student) - p and student[-1 - s] == teacher[-1 - s]:
        s += 1
    assert p + s == len(student), "the teacher's prompt is not the student's with one span inserted"
    assert teacher[:p] + teacher[len(teacher) - s :] == student
    return p, len(teacher) - s


@pytest.mark.parametrize(
    ("template", "default"),
    [
        (SMOLLM2, SMOLLM2_DEFAULT),
        (QWEN, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        (CHATML, None),
        (NO_SYSTEM, None),
        (None, None),
    ],
)
def test_default_system_prompt_read_off_the_template(template, default):
    assert default_system_prompt(tokenizer(template)) == default


@pytest.mark.parametrize("template", [SMOLLM2, QWEN])
def test_teacher_adds_the_context_to_the_default_system_prompt(template):
    tok = tokenizer(template)
    teacher = ContextTeacher(None, tok, {"harmful": H_CTX, "benign": B_CTX})
    for it, ctx in zip(ITEMS, (H_CTX, B_CTX), strict=True):
        student_text = chat_text(tok, it.prompt)  # what the student's rollout reads (train.OnPolicyStep)
        teacher_text = teacher.prompt_text(it)
        assert default_system_prompt(tok) in teacher_text and ctx in teacher_text
        (student,), (taught,) = encode_prompts(tok, [student_text]), encode_prompts(tok, [teacher_text])
        start, end = inserted(student, taught)
        added, span = f"\n\n{ctx}", tok.decode(taught[start:end])
        assert len(span) == len(added) and span in added + added  # the context, up to where the ends match
        assert teacher_text.replace(f"\n\n{ctx}", "", 1) == student_text


def test_without_a_default_the_context_is_the_system_message():
    tok = tokenizer(CHATML)
    student_text = chat_text(tok, ITEMS[0].prompt)
    teacher_text = ContextTeacher(None, tok, {"harmful": H_CTX}).prompt_text(ITEMS[0])
    assert teacher_text == f"<|im_start|>system\n{H_CTX}<|im_end|>\n" + student_text
    (student,), (taught,) = encode_prompts(tok, [student_text]), encode_prompts(tok, [teacher_text])
    start, end = inserted(student, taught)
    added, span = f"<|im_start|>system\n{H_CTX}<|im_end|>\n", tok.decode(taught[start:end])
    assert len(span) == len(added) and span in added + added


def test_no_system_role_puts_the_context_ahead_of_the_user_text():
    tok = tokenizer(NO_SYSTEM)
    assert chat_text(tok, "Hi", system=H_CTX) == chat_text(tok, f"{H_CTX}\n\nHi")


def test_a_group_without_context_reads_the_students_prompt():
    tok = tokenizer(SMOLLM2)
    teacher = ContextTeacher(None, tok, {"harmful": H_CTX, "benign": None})
    assert teacher.prompt_text(ITEMS[1]) == chat_text(tok, ITEMS[1].prompt)
    assert SMOLLM2_DEFAULT in chat_text(tok, ITEMS[1].prompt)
