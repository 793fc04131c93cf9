"""Caller authentication: RS256 bearer tokens (artStore or Keycloak layout) to a `Principal`.

Key and token making for the CLI and tests lives in `ingester.auth.tokens`, imported on
its own so the server does not load it.
"""

from .keys import JwksKeySource as JwksKeySource
from .keys import KeySource as KeySource
from .keys import PemKeySource as PemKeySource
from .keys import StaticKeySource as StaticKeySource
from .principal import ADMIN_ROLES as ADMIN_ROLES
from .principal import UPLOAD_ROLES as UPLOAD_ROLES
from .principal import Principal as Principal
from .principal import principal_from_claims as principal_from_claims
from .verifier import TokenVerifier as TokenVerifier
from .verifier import bearer_from_header as bearer_from_header
from .verifier import build_verifier as build_verifier
from .verifier import require_upload as require_upload
