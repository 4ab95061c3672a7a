import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CredentialInfo(_message.Message):
    __slots__ = ("user_id", "upstream", "token_type", "scopes", "expires_at", "obtained_via", "updated_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    OBTAINED_VIA_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    upstream: str
    token_type: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expires_at: _timestamp_pb2.Timestamp
    obtained_via: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., upstream: _Optional[str] = ..., token_type: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., obtained_via: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BuildAuthorizationURLRequest(_message.Message):
    __slots__ = ("user_id", "upstream")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    upstream: str
    def __init__(self, user_id: _Optional[str] = ..., upstream: _Optional[str] = ...) -> None: ...

class BuildAuthorizationURLResponse(_message.Message):
    __slots__ = ("authorization_url", "state", "expires_at")
    AUTHORIZATION_URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    authorization_url: str
    state: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, authorization_url: _Optional[str] = ..., state: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("state", "code", "user_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    state: str
    code: str
    user_id: str
    def __init__(self, state: _Optional[str] = ..., code: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("credential",)
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    credential: CredentialInfo
    def __init__(self, credential: _Optional[_Union[CredentialInfo, _Mapping]] = ...) -> None: ...

class DenyRequest(_message.Message):
    __slots__ = ("state", "error", "error_description")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    state: str
    error: str
    error_description: str
    def __init__(self, state: _Optional[str] = ..., error: _Optional[str] = ..., error_description: _Optional[str] = ...) -> None: ...

class DenyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ("user_id", "upstream")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    upstream: str
    def __init__(self, user_id: _Optional[str] = ..., upstream: _Optional[str] = ...) -> None: ...

class RefreshResponse(_message.Message):
    __slots__ = ("credential",)
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    credential: CredentialInfo
    def __init__(self, credential: _Optional[_Union[CredentialInfo, _Mapping]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("user_id", "upstream", "subject_token", "min_valid_seconds")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIN_VALID_SECONDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    upstream: str
    subject_token: str
    min_valid_seconds: int
    def __init__(self, user_id: _Optional[str] = ..., upstream: _Optional[str] = ..., subject_token: _Optional[str] = ..., min_valid_seconds: _Optional[int] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("access_token", "token_type", "expires_at", "scopes", "obtained_via", "header_name", "header_value")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    OBTAINED_VIA_FIELD_NUMBER: _ClassVar[int]
    HEADER_NAME_FIELD_NUMBER: _ClassVar[int]
    HEADER_VALUE_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    token_type: str
    expires_at: _timestamp_pb2.Timestamp
    scopes: _containers.RepeatedScalarFieldContainer[str]
    obtained_via: str
    header_name: str
    header_value: str
    def __init__(self, access_token: _Optional[str] = ..., token_type: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scopes: _Optional[_Iterable[str]] = ..., obtained_via: _Optional[str] = ..., header_name: _Optional[str] = ..., header_value: _Optional[str] = ...) -> None: ...
