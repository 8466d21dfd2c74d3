package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * A namespace's policy, as the server holds it.
 *
 * @param namespace the namespace (empty: the default policy)
 * @param policy the policy in force
 * @param isDefault the namespace has no policy of its own; this is the default
 * @param raw the response message
 */
public record NamespacePolicy(
        String namespace, Policy policy, boolean isDefault, CoordinatorOuterClass.NamespacePolicy raw) {

    static NamespacePolicy fromProto(CoordinatorOuterClass.NamespacePolicy m) {
        return new NamespacePolicy(m.getNamespace(), Policy.fromProto(m.getPolicy()), m.getIsDefault(), m);
    }
}
